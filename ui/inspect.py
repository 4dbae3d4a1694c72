"""Looking inside runs: the step timeline, comparison, tokens, exports, PNG settings."""

from __future__ import annotations

import html

import gradio as gr

from pipelines import SCHEDULER_NAMES
from pipelines.export import export
from pipelines.metadata import read_parameters

from .stream import RunView, schedule_svg


def tokens_html(tokens) -> str:
    """Each token as a chip with its id; tokens past the encoder's limit struck through."""
    if not tokens:
        return ""
    cut = sum(not t.kept for t in tokens)
    chips = "".join(
        f'<span class="sw-token{"" if t.kept else " cut"}" title="id {t.id}">{html.escape(t.text)}'
        f"<sub>{t.id}</sub></span>" for t in tokens)
    note = f" · <b>{cut} cut off</b> (the encoder reads {len(tokens) - cut})" if cut else ""
    return f'<div class="sw-tokens"><small>{len(tokens)} tokens{note}</small><div>{chips}</div></div>'


def run_choices(runs: list[RunView] | None) -> list[tuple[str, str]]:
    """Dropdown choices: each run's label, valued by its stable id (positions shift as runs come and go)."""
    return [(view.label, view.id) for view in runs or []]


class Inspector:
    """Handlers for the Inspect panel; `anatomy` turns stored latents into pictures."""

    def __init__(self, anatomy):
        self.anatomy = anatomy

    def tokens(self, prompt: str) -> str:
        return tokens_html(self.anatomy.tokens(prompt or ""))

    def refresh(self, runs: list[RunView] | None, other: str | None):
        """After a run: list the session's runs, point the timeline at the newest, last step.
        The run compared with stays chosen while the session keeps it, and is cleared after."""
        runs = runs or []
        steps = len(runs[-1].frames) if runs else 0
        other = other if _pick(runs, other) is not None else None
        return (gr.Dropdown(choices=run_choices(runs), value=runs[-1].id if runs else None),
                gr.Dropdown(choices=run_choices(runs), value=other),
                gr.Slider(maximum=max(steps, 1), value=steps))

    def timeline(self, runs: list[RunView] | None, pick: str | None, other: str | None, step: int):
        """`show`, or why the picked run's steps are gone from memory."""
        view = _pick(runs, pick if pick is not None else -1)
        if view is not None and view.dropped:
            return None, None, None, view.dropped, [], ""
        return self.show(runs, pick, other, step)

    def export_run(self, runs: list[RunView] | None, pick: str | None, kind: str) -> str:
        """`export`, or why the picked run's steps are gone from memory."""
        view = _pick(runs, pick)
        if view is not None and view.dropped:
            raise gr.Error(view.dropped)
        return self.export(runs, pick, kind)

    def show(self, runs: list[RunView] | None, pick: int | None, other: int | None, step: int):
        """The chosen step of run `pick` (0 = the seed's starting noise), and run `other` beside it.
        With no run picked yet, the newest: scrubbing works while it streams."""
        view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
        if view is None:
            return None, None, None, "Run something first: every step of it lands here.", [], ""
        preview = view.request.preview
        step = min(int(step), len(view.frames))  # the run may still be going
        if step == 0:
            noise = self.anatomy.initial_noise(view.request)
            return noise, None, self._beside(runs, other, 0), "**step 0**: the seed's starting noise", [], \
                schedule_svg(view.levels, 0) if view.levels else ""
        frame = view.frames[step - 1]
        x_t, x0, channels = self.anatomy.step_pictures(frame, preview)
        info = (f"**step {frame.step}/{frame.total}** · timestep t={frame.timestep:.0f} · "
                f"noise level √(1−ᾱ)={frame.noise_level:.3f} · σ={frame.sigma:.3f}")
        gallery = [(image, f"channel {n}") for n, image in enumerate(channels, 1)]
        return x_t, x0, self._beside(runs, other, step), info, gallery, schedule_svg(view.levels, step)

    def _beside(self, runs, other, step):
        view = _pick(runs, other)
        if view is None or not view.frames:
            return None
        frame = view.frames[min(max(step, 1), len(view.frames)) - 1]
        return self.anatomy.step_pictures(frame, view.request.preview)[1]

    def export(self, runs: list[RunView] | None, pick: int | None, kind: str) -> str:
        view = _pick(runs, pick)
        if view is None or not view.frames:
            raise gr.Error("Nothing to export yet: run a generation first.")
        return str(export([f.image for f in view.frames], view.folder / f"steps.{kind}"))

    @staticmethod
    def load_png(path: str | None) -> list:
        """Generation settings from a PNG's "parameters" chunk (A1111 format) into the controls."""
        from PIL import Image

        if not path:
            return [gr.skip()] * 8
        try:
            with Image.open(path) as image:
                settings = read_parameters(image)
        except (OSError, ValueError) as err:
            raise gr.Error(f"Could not read settings from that file: {err}") from None
        keys = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler")
        if settings.get("scheduler") not in SCHEDULER_NAMES:
            gr.Warning(f"Sampler {settings.pop('scheduler', None)!r} is not offered here; keeping the current one.")
        gr.Info(f"Loaded settings{' for model ' + settings['model'] if 'model' in settings else ''}.")
        return [settings.get(key, gr.skip()) for key in keys]


def _pick(runs: list[RunView] | None, key: str | int | None) -> RunView | None:
    """The run whose id is `key` (a dropdown value), or at position `key` (an int; -1 is
    the newest); None for a run the session no longer keeps."""
    if isinstance(key, int) and runs and -len(runs) <= key < len(runs):
        return runs[key]
    return next((view for view in runs or [] if view.id == key), None)

