"""Inputs whose own checks name the field.

Gradio checks a Slider's range or a Dropdown's choices before our handler runs
and says only "Value 0 is less than minimum value 1." These subclasses add the
field's label, so an API caller learns which parameter to change. `is_template`
makes each render as its parent component.
"""

from __future__ import annotations

import gradio as gr


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
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)


class Dropdown(gr.Dropdown):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)


class Radio(gr.Radio):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)
