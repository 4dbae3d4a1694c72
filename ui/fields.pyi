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

from gradio.events import Dependency

class Slider(gr.Slider):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Number(gr.Number):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Dropdown(gr.Dropdown):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Radio(gr.Radio):
    is_template = True

    def preprocess(self, payload):
        return _named(self, super().preprocess, payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component