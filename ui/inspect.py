"""Looking inside runs: the step timeline, inside the denoiser, comparison, tokens, exports, PNG settings."""

from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple

import gradio as gr
from PIL import Image

from pipelines import SCHEDULER_NAMES, Limits, ModelLoadError
from pipelines.anatomy import channels
from pipelines.export import export
from pipelines.metadata import read_parameters

from .stream import RunView, lines_svg, noise_level_name, schedule_svg

# what `noise_pred` is, by the scheduler's prediction_type (`NoiseSchedule.prediction_type`)
PREDICTION = {"epsilon": "ε", "v_prediction": "v", "sample": "x0", "flow": "flow velocity"}
SIGNED = "0 is mid-grey, each picture scaled by its own max |value|"


def tokens_html(encoded, label: str | None = None) -> str:
    """Each text encoder's reading of the prompt (`pipelines.anatomy.Encoded`): each token as a chip
    with its id, tokens past the encoder's limit struck through."""
    blocks = []
    for e in encoded:
        chips = "".join(
            f'<span class="sw-token{"" if t.kept else " cut"}" title="id {t.id}">{html.escape(t.text)}'
            f"<sub>{t.id}</sub></span>" for t in e.tokens)
        note = f" · <b>{e.cut} cut off</b> (the encoder reads {e.limit})" if e.cut else f" (reads {e.limit})"
        head = html.escape(f"{label} · {e.encoder}" if label else e.encoder)
        blocks.append(f'<div class="sw-tokens"><small>{head}: {len(e.tokens)} tokens{note}</small>'
                      f"<div>{chips}</div></div>")
    return "".join(blocks)


class Inside(NamedTuple):
    """What the Inspect panel shows inside the denoiser at one step (`Inspector.inside`): each
    section's note (markdown) and its pictures as (PIL image, label); empty lists where there are none."""

    update_note: str
    update: list  # x_t before the step, noise_pred, what the step removed, x_t after it
    guidance_note: str
    guidance: list  # noise_pred_uncond, noise_pred_text, their difference (the guidance direction)
    guidance_plot: str  # svg over the run: RMS of g·(text − uncond) and of noise_pred per step
    attention_note: str
    tokens: list  # the run's prompt tokens as Radio choices: ("k · word", k - 1)
    token: int | None  # the token whose map `overlay` shows
    overlay: tuple | None  # (x0 with that token's map over it, label)
    grid: list  # every token's map over x0, captioned "k · word"


def run_choices(runs: list[RunView] | None) -> list[tuple[str, str]]:
    """Dropdown choices: each run's label, valued by its stable id (positions shift as runs come and go)."""
    return [(view.label, view.id) for view in runs or []]


class Inspector:
    """Handlers for the Inspect panel. They show what runs made and stored in their
    frames, and tokenize with `anatomy`'s tokenizers: no handler loads, evicts or
    runs a model, so they answer while a run holds the GPU. Loaded settings are checked
    against the loaded model's `limits` and the `schedulers` it offers, or those of the session's
    picked model (`models(source)` gives its view, with `.limits`)."""

    def __init__(self, anatomy, limits: Limits = Limits(), schedulers: tuple[str, ...] = SCHEDULER_NAMES,
                 models=None):
        self.anatomy = anatomy
        self.limits = limits
        self.schedulers = tuple(schedulers)
        self.models = models

    def tokens(self, prompt: str, model: str | None = None) -> str:
        """The prompt's tokens as each text encoder of each mode's model reads them (the session's
        picked `model`, default the start one); one block per source and encoder."""
        sources = self.anatomy.sources_for(model) if model else self.anatomy.sources
        modes_of: dict[str, list[str]] = {}
        for mode, source in sources.items():
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
        """`show` (its channel gallery labelled with their count), or why the picked run's steps are
        gone from memory."""
        view = _pick(runs, pick if pick is not None else -1)
        if view is not None and view.dropped:
            return None, None, None, view.dropped, [], ""
        *shown, gallery, plot = self.show(runs, pick, other, step)
        # 4 channels for SD and SDXL, 16 for SD 3 and Flux: the frame's own count
        return (*shown, gr.Gallery(gallery, label=channels_label(len(gallery))) if gallery else [], plot)

    def export_run(self, runs: list[RunView] | None, pick: str | None, kind: str) -> str:
        """`export`, or why the picked run's steps are gone from memory."""
        view = _pick(runs, pick)
        if view is not None and view.dropped:
            raise gr.Error(view.dropped)
        return self.export(runs, pick, kind)

    def show(self, runs: list[RunView] | None, pick: str | int | None, other: str | int | None,
             step: int):
        """Step `step` of run `pick` (a run id, or a position in `runs`) as the run made it
        (0 = the latents it started from), and run `other`'s x0 beside it. With no run picked
        yet, the newest: scrubbing works while it streams. Returns (x_t, x0, beside, info
        markdown, channel gallery, schedule svg)."""
        view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
        if view is None:
            return None, None, None, "Run something first: every step of it lands here.", [], ""
        if not view.frames:
            return None, None, None, "No step of this run has finished (yet).", [], ""
        step = min(int(step), len(view.frames))  # the run may still be going
        first = view.frames[0]
        levels, flow = first.schedule_levels(), first.schedule.flow_matching
        plot = schedule_svg(levels, step, flow)
        beside, beside_note = self._beside(runs, other, step)
        if step == 0:
            start = "the seed's starting noise" if view.request.mode == "txt2img" else (
                f"the input image's latents, noised to strength {view.request.strength}")
            info = f"**step 0**: the latents the run started from, {start} · " + _noise(flow, levels[0],
                                                                                           first.schedule.sigma(0))
            return (first.start_pixels.pil(), None, beside, info + beside_note,
                    _gallery(first.start_latents.tensor()), plot)
        frame = view.frames[step - 1]
        info = (f"**step {frame.step}/{frame.total}** · the denoiser at timestep t={frame.timestep:.0f} · "
                f"x_t after it: {_noise(flow, frame.noise_level, frame.sigma)}")
        if step > 1 and view.frames[step - 2].timestep == frame.timestep:
            info += f" · same timestep as step {step - 1}: this scheduler evaluates it a second time"
        return (frame.xt_pixels.pil(), frame.x0_pixels.pil(), beside, info + beside_note,
                _gallery(frame.latents.tensor()), plot)

    def inside(self, runs: list[RunView] | None, pick: str | int | None, step: int, token: int | None = None) -> Inside:
        """Inside the denoiser at step `step` of run `pick` (as `show`; none at step 0): the update
        x_t -> x_{t-1} with the noise_pred that made it; under classifier-free guidance the two
        predictions, their difference and its size over the run; with recorded attention, token
        `token`'s map over x0 (the first token where `token` is not one of the run's) and every
        token's. Latent-space tensors are pictures of the run's latent->RGB map without its bias
        (`Frame.picture`); nothing here loads a model (on a CPU the run's own decoder may still be making
        the view it did not stream: `pipelines.generate.Frame`)."""
        view, step = _at(runs, pick, step)
        if view is None:
            return Inside("", [], "", [], "", "", [], None, None, [])
        first, frames = view.frames[0], view.frames
        if step == 0:
            later = "Step 0 is where the run starts: move the slider to a step to see"
            return Inside(f"{later} its update.", [], f"{later} its guidance.", [], self._guidance_plot(view, 0),
                          *self._attention(first, None, token, f"{later} where each word looks."))
        frame = frames[step - 1]
        before = frames[step - 2] if step > 1 else None
        prediction = PREDICTION.get(first.schedule.prediction_type, first.schedule.prediction_type)
        noise, noise_max = frame.picture(frame.noise_pred.tensor())
        removed, removed_max = frame.picture(frame.removed(before.latents if before else first.start_latents))
        update = [((before.xt_pixels if before else first.start_pixels).pil(),
                   f"x_t before (step {step - 1}{'' if before else ': the start'})"),
                  (noise, f"noise_pred ({prediction}) · max |value| {noise_max:.3g}"),
                  (removed, f"x_t − x_{{t-1}} · max |value| {removed_max:.3g}"),
                  (frame.xt_pixels.pil(), f"x_{{t-1}} (after step {step})")]
        after_cfg = ", after CFG" if frame.noise_pred_text is not None else ""
        update_note = (f"**The update at step {step}/{frame.total}**, timestep t={frame.timestep:.0f}: the scheduler "
                       f"takes x_t and noise_pred ({prediction}{after_cfg}) to x_{{t-1}}; x_t − x_{{t-1}} is what "
                       f"it removed. Latent tensors through the latent→RGB map without its bias: {SIGNED}.")
        attention_note = (f"**Cross-attention at step {step}**: each prompt token's share of every latent pixel's "
                          "attention, averaged over heads and layers, upsampled bilinear over a grey x0. Heat "
                          "(dark → bright): from the token's own least to its most at this step.")
        return Inside(update_note, update, *self._guidance(view, frame, step),
                      *self._attention(first, frame, token, attention_note))

    def inside_updates(self, runs: list[RunView] | None, pick: str | None, step: int) -> tuple:
        """`inside` as the panel's updates, but for the token chips and overlay (`token_chips`,
        `overlay_update`): each section's note, its row of pictures (shown only with pictures in it)
        and the pictures; the guidance plot; the attention box (shown with a grid) and its grid."""
        shown = self.inside(runs, pick, step)

        def row(pictures: list, count: int) -> list:
            return [gr.Row(visible=bool(pictures)), *(gr.Image(value=image, label=label)
                                                      for image, label in pictures or [(None, None)] * count)]

        return (shown.update_note, *row(shown.update, 4), shown.guidance_note, *row(shown.guidance, 3),
                shown.guidance_plot, shown.attention_note, gr.Column(visible=bool(shown.grid)), shown.grid)

    def token_chips(self, runs: list[RunView] | None, pick: str | None, token: int | None) -> gr.Radio:
        """The picked run's prompt tokens as chips, `token` still chosen where it is one of them."""
        view, _ = _at(runs, pick, 0)
        choices, token = self._attention(view.frames[0], None, token, "")[1:3] if view else ([], None)
        return gr.Radio(choices=choices, value=token)

    def overlay_update(self, runs: list[RunView] | None, pick: str | None, step: int, token: int | None) -> gr.Image:
        """Token `token`'s map over x0 at `step` (as `inside`), labelled with the token and the heat's range."""
        view, step = _at(runs, pick, step)
        overlay = self._attention(view.frames[0], view.frames[step - 1], token, "")[3] if view and step else None
        image, label = overlay or (None, None)
        return gr.Image(value=image, label=label)

    @staticmethod
    def _guidance(view: RunView, frame, step: int) -> tuple[str, list, str]:
        """The guidance section at `step`: note, pictures and plot."""
        g = view.request.guidance_scale
        if frame.noise_pred_text is None:
            if not view.request.classifier_free_guidance:
                return (f"CFG was off: guidance_scale {g} ≤ 1, so the denoiser made one prediction per step "
                        "(no uncond/text pair).", [], "")
            return (f"No CFG: this model takes guidance {g} as an input (distilled guidance) and makes one "
                    "prediction per step (no uncond/text pair).", [], "")
        uncond, uncond_max = frame.picture(frame.noise_pred_uncond.tensor())
        text, text_max = frame.picture(frame.noise_pred_text.tensor())
        direction, direction_max = frame.picture(frame.guidance)
        pictures = [(uncond, f"noise_pred_uncond · max |value| {uncond_max:.3g}"),
                    (text, f"noise_pred_text · max |value| {text_max:.3g}"),
                    (direction, f"text − uncond · max |value| {direction_max:.3g}")]
        note = (f"**CFG {g}**: noise_pred = uncond + {g}·(text − uncond), text − uncond being the guidance "
                f"direction. At step {step}: RMS of {g}·(text − uncond) {g * frame.guidance_rms:.3g}, of noise_pred "
                f"{frame.noise_pred_rms:.3g}. Pictures: {SIGNED}.")
        return note, pictures, Inspector._guidance_plot(view, step)

    @staticmethod
    def _guidance_plot(view: RunView, step: int) -> str:
        if view.frames[0].noise_pred_text is None:
            return ""
        g = view.request.guidance_scale
        return lines_svg([(f"{g}·(text − uncond)", [g * f.guidance_rms for f in view.frames]),
                          ("noise_pred", [f.noise_pred_rms for f in view.frames])], step, "RMS per element")

    @staticmethod
    def _attention(first, frame, token: int | None, note: str) -> tuple[str, list, int | None, tuple | None, list]:
        """The attention section: note, the run's token choices, the token shown (kept where it is one of
        the run's, else the first), and at a step (`frame`) that token's overlay and every token's."""
        if first.attention is None:
            return _NO_ATTENTION, [], None, None, []
        labels = [f"{k} · {word}" for k, word in enumerate(first.tokens, 1)]
        token = token if isinstance(token, int) and 0 <= token < len(labels) else 0
        choices = [(label, k) for k, label in enumerate(labels)]
        if frame is None:
            return note, choices, token, None, []
        overlays = frame.attention_overlays()
        picture, low, high = overlays[token]
        caption = f"{labels[token]} over x0 at step {frame.step} · heat {low:.3g} → {high:.3g}"
        return (note, choices, token, (picture, caption),
                [(image, label) for (image, *_), label in zip(overlays, labels)])

    def _beside(self, runs, other, step) -> tuple:
        """Run `other`'s x0 at `step` (its last step if it is shorter) as that run made it,
        and a note saying which step that is; nothing at step 0, before any x0."""
        view = _pick(runs, other)
        if view is None or not view.frames or step == 0:
            return None, ""
        frame = view.frames[min(step, len(view.frames)) - 1]
        note = "" if frame.step == step else f" · compared run at step {frame.step}/{frame.total}, its last so far"
        return frame.x0_pixels.pil(), note

    def export(self, runs: list[RunView] | None, pick: str | int | None, kind: str) -> str:
        view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
        if view is None or not view.frames:
            raise gr.Error("Nothing to export yet: run a generation first, then download its steps.")
        try:
            return str(export([f.image for f in view.frames], view.folder / view.file_name(kind)))
        except FileNotFoundError:  # the run store deleted the folder: it keeps only the newest runs
            raise gr.Error("This run's files are gone (the server keeps only its newest runs): run it again "
                           "to download its steps.") from None
        except (OSError, ValueError) as err:  # disk full, encoder refused
            raise gr.Error(f"Could not write the {kind.upper()}: {err}") from None

    def tensors_file(self, runs: list[RunView] | None, pick: str | int | None) -> str:
        """The picked run's tensors (`RunView.tensors`, a .safetensors path; the newest run with no
        pick), or a gr.Error saying why it has none."""
        view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
        if view is None:
            raise gr.Error("Nothing to download yet: run a generation first, then download its tensors.")
        if view.tensors is None and not view.ended:
            raise gr.Error("This run has no tensors file yet: it is still running, and the file is written when it "
                           "finishes or is stopped. Download them then.")
        if view.tensors is None:
            why = "its steps left the server's memory during the run" if view.dropped else "the disk refused them"
            raise gr.Error(f"This run's tensors were not saved: {why}. Run it again (same seed and settings) to "
                           "download them.")
        if not Path(view.tensors).is_file():  # the run store deleted the folder: it keeps only the newest runs
            raise gr.Error("This run's files are gone (the server keeps only its newest runs): run it again to "
                           "download its tensors.")
        return view.tensors

    def load_png(self, path: str | None, model: str | None = None) -> tuple[dict, str]:
        """Generation settings from an image's metadata, by field name, and a note of what was
        loaded and what was not. Fields the file has no value for, or whose value does not fit
        the loaded model (the session's picked `model`), are left out: their controls keep their values."""
        if not path:
            return {}, gr.skip()
        limits, schedulers = self.limits, self.schedulers
        if model and self.models is not None:
            limits = self.models(model).limits
            schedulers = limits.schedulers
        try:
            read = read_parameters(path, limits, schedulers)
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
        return read.fields, note

    @staticmethod
    def _not_loaded(message: str) -> tuple[dict, str]:
        # a warning, not gr.Error: the controls are untouched, and an error would mark each one red
        gr.Warning(html.escape(message), title="Load settings")
        return {}, html.escape(message)


_NO_ATTENTION = ("No attention maps in this run: tick “Record attention maps” before Generate to see where each "
                 "word looks.")


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


def _noise(flow_matching: bool, level: float, sigma: float) -> str:
    """The noise level of x_t in the family's own terms: flow matching's sigma is its share of noise."""
    name = noise_level_name(flow_matching)
    return f"noise level {name}={level:.3f}" if flow_matching else f"noise level {name}={level:.3f} · σ={sigma:.3f}"


def channels_label(count: int) -> str:
    return f"The {count} latent channels of x_t"


def _gallery(latents) -> list[tuple]:
    return [(image, f"channel {n}") for n, image in enumerate(channels(latents), 1)]


def _at(runs: list[RunView] | None, pick: str | int | None, step: int) -> tuple[RunView | None, int]:
    """Run `pick` (the newest with no pick) if it has steps in memory, and `step` within those it has
    (a run may still be going); (None, 0) otherwise."""
    view = _pick(runs, pick if pick is not None else len(runs or []) - 1)
    if view is None or view.dropped or not view.frames:
        return None, 0
    return view, min(int(step), len(view.frames))


def _pick(runs: list[RunView] | None, key: str | int | None) -> RunView | None:
    """The run whose id is `key` (a dropdown value), or at position `key` (an int; -1 is
    the newest); None for a run the session no longer keeps."""
    if isinstance(key, int) and runs and -len(runs) <= key < len(runs):
        return runs[key]
    return next((view for view in runs or [] if view.id == key), None)

