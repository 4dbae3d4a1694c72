"""Looking inside runs: the step timeline, comparison, tokens, exports, PNG settings."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
from PIL import Image

from pipelines import SCHEDULER_NAMES, Limits
from pipelines.export import export
from pipelines.metadata import read_parameters

from .events import KEEP_SESSION_RUNS
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


def run_choices(runs: list[RunView] | None) -> list[tuple[str, int]]:
    return [(view.label, n) for n, view in enumerate(runs or [])]


# What "Load settings" fills, in the order of its outputs; strength goes to the img2img and depth sliders.
LOADED = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler", "strength",
          "strength")


class Inspector:
    """Handlers for the Inspect panel; `anatomy` turns stored latents into pictures. Loaded
    settings are checked against this server's `limits` and the `schedulers` it offers."""

    def __init__(self, anatomy, limits: Limits = Limits(), schedulers: tuple[str, ...] = SCHEDULER_NAMES):
        self.anatomy = anatomy
        self.limits = limits
        self.schedulers = tuple(schedulers)

    def tokens(self, prompt: str) -> str:
        return tokens_html(self.anatomy.tokens(prompt or ""))

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
        view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
        if view is None or not view.frames:
            raise gr.Error("Nothing to export yet: run a generation first, then download its steps.")
        try:
            return str(export([f.image for f in view.frames], view.folder / f"steps.{kind}"))
        except FileNotFoundError:  # the run store deleted the folder: it keeps only the newest runs
            raise gr.Error("This run's files are gone (the server keeps only its newest runs): run it again "
                           "to download its steps.") from None
        except (OSError, ValueError) as err:  # disk full, encoder refused
            raise gr.Error(f"Could not write the {kind.upper()}: {err}") from None

    def load_png(self, path: str | None) -> list:
        """Generation settings from an image's metadata into the controls named by `LOADED`, then
        a note of what was loaded and what was not. Controls the file has no value for, or whose
        value does not fit the loaded model, keep theirs (gr.skip()); nothing is set to empty text."""
        if not path:
            return [gr.skip()] * (len(LOADED) + 1)
        try:
            read = read_parameters(path, self.limits, self.schedulers)
        except ValueError as err:
            return self._not_loaded(f"No settings loaded: {err}.")
        except (OSError, SyntaxError, Image.DecompressionBombError):
            return self._not_loaded(f"No settings loaded: {Path(path).name} is not an image that can be read.")
        loaded = html.escape(_loaded_summary(read))
        notes = [html.escape(note) for note in read.notes]
        gr.Info(loaded, title="Loaded settings")
        if notes:
            gr.Warning("; ".join(notes), title="Some settings were not loaded")
        note = f"**{loaded}**" + "".join(f"\n- {n}" for n in notes)
        return [read.fields.get(key, gr.skip()) for key in LOADED] + [note]

    @staticmethod
    def _not_loaded(message: str) -> list:
        # a warning, not gr.Error: the controls are untouched, and an error would mark each one red
        gr.Warning(html.escape(message), title="Load settings")
        return [gr.skip()] * len(LOADED) + [html.escape(message)]


def _loaded_summary(read) -> str:
    """One line: which settings came from which tool, with their values (prompts by name only)."""
    f = read.fields
    parts = [label for key, label in (("prompt", "prompt"), ("negative_prompt", "negative prompt")) if key in f]
    parts += [f"{label} {f[key]}" for key, label in (("seed", "seed"), ("steps", "steps"), ("guidance_scale", "CFG"))
              if key in f]
    if "width" in f:
        parts.append(f"size {f['width']}x{f['height']}")
    parts += [f"{label} {f[key]}" for key, label in (("scheduler", "scheduler"), ("strength", "strength")) if key in f]
    made = f" (made with model {read.model})" if read.model else ""
    if not parts:
        return f"Nothing loaded from the {read.generator} settings{made}: see the notes."
    return f"Loaded from {read.generator}{made}: {', '.join(parts)}."


def _pick(runs, n) -> RunView | None:
    if not runs or n is None or not 0 <= int(n) < len(runs):  # stale or empty choice
        return None
    return runs[int(n)]

