"""Looking inside runs: the step timeline, comparison, tokens, exports, PNG settings."""

from __future__ import annotations

import html

import gradio as gr

from pipelines import SCHEDULER_NAMES, ModelLoadError
from pipelines.anatomy import channels
from pipelines.export import export
from pipelines.metadata import read_parameters

from .events import KEEP_SESSION_RUNS
from .stream import RunView, schedule_svg


def tokens_html(tokens, label: str | None = None) -> str:
    """Each token as a chip with its id; tokens past the encoder's limit struck through."""
    if not tokens:
        return ""
    cut = sum(not t.kept for t in tokens)
    chips = "".join(
        f'<span class="sw-token{"" if t.kept else " cut"}" title="id {t.id}">{html.escape(t.text)}'
        f"<sub>{t.id}</sub></span>" for t in tokens)
    note = f" · <b>{cut} cut off</b> (the encoder reads {len(tokens) - cut})" if cut else ""
    head = f"{html.escape(label)}: " if label else ""
    return f'<div class="sw-tokens"><small>{head}{len(tokens)} tokens{note}</small><div>{chips}</div></div>'


def run_choices(runs: list[RunView] | None) -> list[tuple[str, int]]:
    return [(view.label, n) for n, view in enumerate(runs or [])]


class Inspector:
    """Handlers for the Inspect panel. They show what runs made and stored in their
    frames, and tokenize with `anatomy`'s tokenizers: no handler loads, evicts or
    runs a model, so they may answer outside the queue while a run holds the GPU."""

    def __init__(self, anatomy):
        self.anatomy = anatomy

    def tokens(self, prompt: str) -> str:
        """The prompt's tokens as each mode's model reads them; one block per model source."""
        modes_of: dict[str, list[str]] = {}
        for mode, source in self.anatomy.sources.items():
            modes_of.setdefault(source, []).append(mode)
        blocks = []
        for source, modes in modes_of.items():
            label = f"{' and '.join(modes)} ({source})" if len(modes_of) > 1 else None
            try:
                blocks.append(tokens_html(self.anatomy.tokens(prompt or "", source), label))
            except ModelLoadError as err:
                blocks.append(f'<div class="sw-tokens"><small>{html.escape(label or source)}: no tokens, '
                              f"{html.escape(str(err))}</small></div>")
        return "".join(blocks)

    def refresh(self, runs: list[RunView] | None, other: int | None):
        """After a run: list the session's runs, point the timeline at the newest, last step.
        The run compared with keeps its place (older runs shift down as new ones come)."""
        choices = run_choices(runs)
        newest = len(choices) - 1 if choices else None
        steps = len(runs[-1].frames) if runs else 0
        other = other - 1 if other is not None and len(runs or []) == KEEP_SESSION_RUNS else other
        return (gr.Dropdown(choices=choices, value=newest),
                gr.Dropdown(choices=choices, value=other if other is not None and other >= 0 else None),
                gr.Slider(maximum=max(steps, 1), value=steps))

    def show(self, runs: list[RunView] | None, pick: int | None, other: int | None, step: int):
        """Step `step` of run `pick` as the run made it (0 = the latents it started from), and
        run `other`'s x0 beside it. With no run picked yet, the newest: scrubbing works while
        it streams. Returns (x_t, x0, beside, info markdown, channel gallery, schedule svg)."""
        view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
        if view is None:
            return None, None, None, "Run something first: every step of it lands here.", [], ""
        if not view.frames:
            return None, None, None, "No step of this run has finished (yet).", [], ""
        step = min(int(step), len(view.frames))  # the run may still be going
        first = view.frames[0]
        levels = first.schedule_levels()
        plot = schedule_svg(levels, step)
        beside, beside_note = self._beside(runs, other, step)
        if step == 0:
            start = "the seed's starting noise" if view.request.mode == "txt2img" else (
                f"the input image's latents, noised to strength {view.request.strength}")
            info = (f"**step 0**: the latents the run started from, {start} · "
                    f"noise level √(1−ᾱ)={levels[0]:.3f} · σ={first.schedule.sigma(0):.3f}")
            return (first.start_pixels.pil(), None, beside, info + beside_note,
                    _gallery(first.start_latents.tensor()), plot)
        frame = view.frames[step - 1]
        info = (f"**step {frame.step}/{frame.total}** · the UNet at timestep t={frame.timestep:.0f} · "
                f"x_t after it: noise level √(1−ᾱ)={frame.noise_level:.3f} · σ={frame.sigma:.3f}")
        if step > 1 and view.frames[step - 2].timestep == frame.timestep:
            info += f" · same timestep as step {step - 1}: this scheduler evaluates it a second time"
        return (frame.xt_pixels.pil(), frame.x0_pixels.pil(), beside, info + beside_note,
                _gallery(frame.latents.tensor()), plot)

    def _beside(self, runs, other, step) -> tuple:
        """Run `other`'s x0 at `step` (its last step if it is shorter) as that run made it,
        and a note saying which step that is; nothing at step 0, before any x0."""
        view = _pick(runs, other)
        if view is None or not view.frames or step == 0:
            return None, ""
        frame = view.frames[min(step, len(view.frames)) - 1]
        note = "" if frame.step == step else f" · compared run at step {frame.step}/{frame.total}, its last so far"
        return frame.x0_pixels.pil(), note

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


def _gallery(latents) -> list[tuple]:
    return [(image, f"channel {n}") for n, image in enumerate(channels(latents), 1)]


def _pick(runs, n) -> RunView | None:
    if not runs or n is None or not 0 <= int(n) < len(runs):  # stale or empty choice
        return None
    return runs[int(n)]

