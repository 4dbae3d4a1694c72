"""Inputs whose own checks name the field, and that hand values over as sent.

Gradio checks a Slider's range or a Dropdown's choices before our handler runs
and says only "Value 0 is less than minimum value 1." These subclasses add the
field's label, so an API caller learns which parameter to change. They change
nothing else on the way: pipelines/request.py validates every value once.
`is_template` makes each render as its parent component.
"""

from __future__ import annotations

import gradio as gr
from gradio import processing_utils


def _named(component, preprocess, payload):
    try:
        return preprocess(payload)
    except gr.Error as err:
        raise gr.Error(f"{component.label}: {err.message}", title="Check the settings") from None
    except (TypeError, ValueError):  # e.g. a string where a number belongs
        raise gr.Error(f"{component.label}: {payload!r} is not a valid value", title="Check the settings") from None


class Slider(gr.Slider):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)


class Number(gr.Number):
    """gr.Number without rounding: with precision=0 Gradio turns seed 1.5 into 2, where
    validate_request refuses a fractional seed as it does fractional steps."""

    is_template = True

    def preprocess(self, payload):
        return _named(self, self._in_bounds, payload)

    def _in_bounds(self, payload):
        if payload is not None:
            self.raise_if_out_of_bounds(payload, self.minimum, self.maximum)
        return payload


class Dropdown(gr.Dropdown):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)


class Radio(gr.Radio):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)


class TokenChips(gr.Radio):
    """The token chips of the run shown. Their choices change with the run, so the browser may
    still send a token of the run shown before (gr.Radio would refuse it with an error): it is
    handed over as sent, and the handler takes it only where it is one of the run's tokens."""

    is_template = True

    def preprocess(self, payload):
        return payload


class ImageFile(gr.Image):
    """An image input that hands the handler the file the user sent, as a path.

    gr.Image decodes every upload, converts it to `image_mode` (8-bit RGB: a 16-bit
    depth map clips to white, transparency turns black) and writes a copy, all before
    the handler, and with no size limit. This one decodes nothing, whatever its `type`:
    pipelines/request.py checks the size from the header and does the one decode.
    """

    is_template = True  # no __init__ of its own: Gradio builds the browser's config from its signature

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path is None and payload.url and payload.url.startswith("data:"):
            return processing_utils.save_base64_to_cache(payload.url, self.GRADIO_CACHE)  # bytes, not pixels
        return payload.path
