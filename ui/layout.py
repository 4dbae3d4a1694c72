"""The Blocks layout. Building it loads no model and starts nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from gradio.data_classes import _StaticFiles

from pipelines import Limits, ModelLoadError
from pipelines.outputs import OutputsFolder
from pipelines.request import FIELDS, MODES, fields_of
from pipelines.presets import Preset

from . import fields
from .events import GenerateFn, Runner, RunUpdate
from .history import History
from .inspect import Inspector
from .stream import MB, RunStore

CSS = """
.sw-progress { display: flex; gap: .75em; align-items: center; font-variant-numeric: tabular-nums; }
.sw-progress progress { flex: 1; height: .9em; }
.sw-schedule { width: 100%; max-width: 520px; height: auto; font: 11px sans-serif; }
.sw-schedule .curve { fill: none; stroke: #f97316; stroke-width: 2; }
.sw-schedule .axis { stroke: #888; } .sw-schedule .now { stroke: #2563eb; fill: #2563eb; }
.sw-schedule text { fill: currentColor; }
.sw-lines .curve.c1 { stroke: #2563eb; } .sw-lines tspan.c0 { fill: #f97316; } .sw-lines tspan.c1 { fill: #2563eb; }
.sw-lines .now { stroke: #16a34a; fill: #16a34a; }
.sw-token { display: inline-block; margin: 2px; padding: 0 4px; border: 1px solid #ccc; border-radius: 4px; }
.sw-token sub { color: #888; margin-left: 2px; } .sw-token.cut { text-decoration: line-through; opacity: .5; }
/* step captions: one small line at the thumbnail's foot, not a label over half of it */
#steps-gallery .caption-label { font-size: 10px; padding: 0 4px; max-width: 100%; opacity: .85; }
/* frames can be latent-sized (64x64 for SD): scale them up, keep the pixels crisp */
#live-preview img, #final-image img, #depth-used img, #steps-gallery img, [id^="timeline-"] img, [id^="inside-"] img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
#history-gallery img { image-rendering: pixelated; }
"""


# one line each under the Preview decoder control, for the decoders the model offers
PREVIEW_INFO = {"latent-rgb": "a linear map of the latent channels, free, latent-sized",
                "tiny-vae": "a small decoder, near-exact, cheap",
                "full-vae": "the model's own VAE, exact, costs about a step"}
VIEW_INFO = "x_t: the noisy latent the sampler holds at this step · x0: the clean image the model predicts from it"
IDLE_STATUS = '<div class="sw-progress"><span>Ready: press Generate to watch every step.</span></div>'


class StepGallery(gr.Gallery):
    """The "Every step" gallery: a gr.Gallery whose API schema is built once.

    A run's updates skip it between resends (`gr.skip()`), and for each skip Gradio builds a new
    component and its pydantic JSON schema: about 6 ms of the event loop's CPU a step on a 2-core CPU
    (gradio 6.31), which the denoising thread waits for through the GIL. The schema is the class's.
    """

    is_template = True  # the page draws it as a plain Gallery
    _schema: dict | None = None

    def api_info(self) -> dict:
        if StepGallery._schema is None:
            StepGallery._schema = super().api_info()
        return StepGallery._schema


@dataclass(frozen=True)
class ModelView:
    """What the app shows for one checkpoint: the start model's, or one picked in the checkpoint picker."""

    source: str
    label: str
    untrained: bool
    limits: Limits  # from the loaded model: sizes, schedulers, previews, modes, negative prompt, guidance kind
    defaults: dict  # start values where no preset applies (the model's own)
    presets: dict[str, Preset]  # those that fit it
    card: dict = field(default_factory=dict)
    preset: str | None = None  # the preset it starts with


@dataclass
class AppSpec:
    """Everything the layout needs to know about the server it fronts."""

    generate: GenerateFn
    model_label: str
    run_root: str
    untrained: bool = False
    limits: Limits = field(default_factory=Limits)
    defaults: dict = field(default_factory=dict)  # start values where no preset applies (the model's own)
    presets: dict[str, Preset] = field(default_factory=dict)
    initial_preset: str | None = None
    examples: list[str] = field(default_factory=list)
    vocabulary: dict[str, list[str]] = field(default_factory=dict)
    keep_runs: int = 32  # run folders on disk
    run_memory: tuple[int, int] = (16, 1024 * MB)  # runs whose steps stay in memory, and their bytes
    session_ttl: float = 3600  # a session's runs are let go this long after its last run
    anatomy: object = None  # pipelines.anatomy.Anatomy: each source's tokens (loads no model)
    delete_cache: tuple[int, int] | None = (3600, 3600)  # Gradio's cache sweep: (every s, older than s)
    # the checkpoint picker (--models-dir): (label, source) of each model, none without it
    source: str | None = None  # the start model's source: each session's model until it picks another
    models: list[tuple[str, str]] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # entries that cannot load: name -> why
    load_model: Callable[[str], ModelView] | None = None  # loads a source; raises ModelLoadError
    outputs: OutputsFolder | None = None  # where every run is saved, and the History reads; None: --no-save
    private_history: bool = False  # each user's History shows only their runs (a shared deployment)
    run_concurrency: int = 1  # runs out of the queue at once: 1 on this process's device, more on Ray workers


def build_app(spec: AppSpec) -> gr.Blocks:
    memory_runs, memory_bytes = spec.run_memory
    store = RunStore(spec.run_root, keep=spec.keep_runs, memory_runs=memory_runs, memory_bytes=memory_bytes)
    _serve_as_is(store.root)
    first = ModelView(spec.source or "", spec.model_label, spec.untrained, spec.limits, spec.defaults, spec.presets,
                      preset=spec.initial_preset)
    # each model a session may be on, by source: the start one and those picked since (this app's, not global)
    views = {first.source: first}

    def view_of(source: str) -> ModelView:
        if source not in views:
            raise ModelLoadError(f"model {source!r} is not loaded: pick it in the checkpoint list")
        return views[source]

    runner = Runner(spec.generate, store, spec.limits, spec.model_label, models=view_of, outputs=spec.outputs)
    start = _start(first)
    lim = spec.limits
    fit = _fitted(first)
    fitted: list[tuple[str, gr.components.Component]] = []  # what a model switch re-fits, by `_fitted` key

    def fits(key: str, component):
        fitted.append((key, component))
        return component

    with gr.Blocks(title="Stepwise: watch Stable Diffusion work", delete_cache=spec.delete_cache) as demo:
        fits("header", gr.Markdown(**fit["header"]))
        # the session's model (a source); None where the app has no start source (tests' bare specs)
        model = gr.State(spec.source)
        if spec.models:  # A1111's checkpoint picker
            picker = fields.Dropdown(spec.models, value=spec.source, label="Checkpoint", elem_id="model-picker",
                                     info="Loading a model waits for runs in progress")
            if spec.broken:
                gr.Markdown("Not loadable: " + " · ".join(f"**{name}**: {why}" for name, why in spec.broken.items()),
                            elem_id="model-broken")
        fits("untrained", gr.Markdown(
            "> **Untrained model.** This checkpoint has random weights built from configs, so its "
            "pictures are noise. Use the bundled micro model, pass `--model`, or pick a trained checkpoint.",
            elem_id="untrained-banner", **fit["untrained"]))
        # this session's run ids (keys of `store`), newest last; API sessions never close,
        # so the runs are let go `session_ttl` after the last one
        runs = gr.State([], time_to_live=spec.session_ttl, delete_callback=store.forget)
        owner = gr.State()  # whose runs these are, for the History (ui/history.py sets it on load)
        with gr.Row():
            with gr.Column(scale=2):
                prompt = _control(gr.Textbox, "prompt", lim, start, lines=2, elem_id="prompt")
                tokens = gr.HTML(elem_id="tokens")
                negative = fits("negative_prompt", _control(gr.Textbox, "negative_prompt", lim, start,
                                                            elem_id="negative-prompt", **fit["negative_prompt"]))
                with fits("tabs", gr.Tabs(**fit["tabs"])) as tabs:
                    with gr.Tab("txt2img", id="txt2img"):
                        fits("note:txt2img", gr.Markdown(**fit["note:txt2img"]))
                        with fits("mode:txt2img", gr.Column(**fit["mode:txt2img"])):
                            go_txt = gr.Button("Generate", variant="primary", elem_id="generate-txt2img")
                    with gr.Tab("img2img", id="img2img"):
                        fits("note:img2img", gr.Markdown(**fit["note:img2img"]))
                        with fits("mode:img2img", gr.Column(**fit["mode:img2img"])):
                            img_in = fields.ImageFile(label="Input image", type="filepath",
                                                      sources=["upload", "clipboard"], elem_id="img2img-input")
                            img_strength = fields.Slider(0.01, 1.0, value=start.get("strength", 0.75), step=0.01,
                                                         label="Strength (how much to change)")
                            go_img = gr.Button("Generate", variant="primary", elem_id="generate-img2img")
                    with gr.Tab("depth", id="depth2img"):
                        fits("note:depth2img", gr.Markdown(**fit["note:depth2img"]))
                        with fits("mode:depth2img", gr.Column(**fit["mode:depth2img"])):
                            with gr.Row():
                                depth_in = fields.ImageFile(label="Input image", type="filepath",
                                                            sources=["upload", "clipboard"], elem_id="depth-input")
                                depth_map = fields.ImageFile(label="Depth map (optional; estimated when empty)",
                                                             type="filepath", sources=["upload"])
                            depth_strength = fields.Slider(0.01, 1.0, value=start.get("strength", 0.8), step=0.01,
                                                           label="Strength")
                            go_depth = gr.Button("Generate", variant="primary", elem_id="generate-depth2img")
                            depth_used = gr.Image(label="Depth map used (near = light)", interactive=False,
                                                  height=160, elem_id="depth-used")
                with gr.Group():
                    with gr.Row():
                        seed = _control(fields.Number, "seed", lim, start, value=start.get("seed", -1), precision=0,
                                        scale=4, elem_id="seed")
                        # text, not emoji: a stock Chromium without emoji fonts draws those as boxes
                        random_seed = gr.Button("Random", scale=0, min_width=80, size="sm", elem_id="seed-random")
                        reuse_seed = gr.Button("Last run's", scale=0, min_width=96, size="sm", elem_id="seed-reuse")
                    steps = fits("steps", fields.Slider(**fit["steps"], elem_id="steps"))
                    guidance = fits("guidance_scale", fields.Slider(**fit["guidance_scale"], elem_id="guidance"))
                    with gr.Row():
                        width = fits("width", fields.Slider(**fit["width"], elem_id="width"))
                        height = fits("height", fields.Slider(**fit["height"], elem_id="height"))
                    scheduler = fits("scheduler", fields.Dropdown(**fit["scheduler"], elem_id="scheduler"))
                    with gr.Row():
                        preview = fits("preview", fields.Radio(**fit["preview"], elem_id="preview"))
                        view = fits("view", fields.Radio(**fit["view"], elem_id="view"))
                    record = _control(gr.Checkbox, "record_attention", lim, start, elem_id="record-attention",
                                      info="Where each prompt word looks, at every step (Inspect). Slower; "
                                           "the picture is the same.")
                    preset = fits("preset", fields.Dropdown(**fit["preset"], label="Preset", elem_id="preset"))
                    preset_note = fits("preset_note", gr.Markdown(**fit["preset_note"]))
                    load_png = gr.File(label="Load settings from an image (A1111, ComfyUI, Fooocus, InvokeAI, NovelAI)",
                                       file_types=[".png", ".jpg", ".jpeg", ".webp"], elem_id="load-png", height=90)
                    load_note = gr.Markdown(elem_id="load-png-note")
                if spec.examples:
                    gr.Examples([[p] for p in spec.examples], inputs=[prompt], label="Example prompts")
                if spec.vocabulary:
                    gr.Markdown("**Words this model knows.** " + " · ".join(
                        f"*{kind}*: {', '.join(words)}" for kind, words in spec.vocabulary.items()))
            with gr.Column(scale=3):
                live = gr.Image(label="Live preview", interactive=False, height=384, elem_id="live-preview")
                with gr.Row():
                    status = gr.HTML(IDLE_STATUS, elem_id="status")
                    stop = gr.Button("Stop", variant="stop", size="sm", scale=0, min_width=80, elem_id="stop")
                final = gr.Image(label="Final image", type="filepath", format="png", interactive=False, height=384,
                                 elem_id="final-image")
                info = gr.Markdown()
                tensors = gr.File(label="The run's tensors (.safetensors: latents, x0, noise_pred, attention)",
                                  interactive=False, height=90, elem_id="run-tensors")
                with gr.Row():
                    to_img2img = fits("send:img2img", gr.Button("Send to img2img", elem_id="send-img2img",
                                                                **fit["send:img2img"]))
                    to_depth = fits("send:depth2img", gr.Button("Send to depth", elem_id="send-depth",
                                                                **fit["send:depth2img"]))
                gallery = StepGallery(label="Every step", columns=6, height="auto", object_fit="contain",
                                      elem_id="steps-gallery")
        with gr.Accordion("Inspect: scrub the steps, compare runs, export", open=True, elem_id="inspect"):
            with gr.Row():
                pick = gr.Dropdown(label="Run", choices=[], elem_id="timeline-run")
                other = gr.Dropdown(label="Compare with", choices=[], elem_id="timeline-compare")
            scrub = gr.Slider(0, lim.max_steps, value=0, step=1, label="Step (0 = the latents the run starts from)",
                              elem_id="timeline-step")
            step_info = gr.Markdown(elem_id="timeline-info")
            with gr.Row():
                xt_view = gr.Image(label="Noisy latent x_t", interactive=False, height=256, elem_id="timeline-xt")
                x0_view = gr.Image(label="Predicted clean image x0", interactive=False, height=256,
                                   elem_id="timeline-x0")
                other_view = gr.Image(label="x0 of the compared run", interactive=False, height=256,
                                      elem_id="timeline-other")
            with gr.Row():
                channels = gr.Gallery(label="The latent channels of x_t", columns=4, height=160,
                                      elem_id="timeline-channels")
                schedule = gr.HTML(elem_id="timeline-schedule")
            with gr.Accordion("Inside the denoiser: the update", elem_id="inside-update"):
                update_note = gr.Markdown(elem_id="inside-update-info")
                with gr.Row(visible=False) as update_row:
                    update_views = [gr.Image(label=label, interactive=False, height=200, elem_id=f"inside-{key}")
                                    for key, label in (("before", "x_t before"), ("noise", "noise_pred"),
                                                       ("removed", "removed"), ("after", "x_{t-1}"))]
            with gr.Accordion("Guidance (CFG)", elem_id="inside-guidance"):
                guidance_note = gr.Markdown(elem_id="inside-guidance-info")
                with gr.Row(visible=False) as guidance_row:
                    guidance_views = [gr.Image(label=label, interactive=False, height=200, elem_id=f"inside-{key}")
                                      for key, label in (("uncond", "uncond"), ("text", "text"),
                                                         ("direction", "text − uncond"))]
                guidance_plot = gr.HTML(elem_id="inside-guidance-plot")
            with gr.Accordion("Where each word looks (cross-attention)", elem_id="inside-attention"):
                attention_note = gr.Markdown(elem_id="inside-attention-info")
                with gr.Column(visible=False) as attention_box:
                    token = fields.TokenChips(choices=[], label="Token", elem_id="attention-token")
                    with gr.Row():
                        overlay = gr.Image(label="Token over x0", interactive=False, height=256,
                                           elem_id="inside-overlay")
                        token_grid = gr.Gallery(label="Every token's map at this step", columns=4, height=256,
                                                object_fit="contain", elem_id="inside-token-grid")
            with gr.Row():
                export_buttons = {kind: gr.Button(f"Download {label}", elem_id=f"export-{kind}") for kind, label in
                                  (("gif", "GIF"), ("webp", "WebP"), ("mp4", "MP4"), ("zip", "PNGs (zip)"))}
                tensors_button = gr.Button("Download tensors", elem_id="export-tensors")
            download = gr.File(label="Download", elem_id="export-file", height=90)  # its own row: names show whole

        # each run field's control in each mode's tab (one shared by all tabs, or the tab's own)
        shared = dict(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, guidance_scale=guidance,
                      width=width, height=height, scheduler=scheduler, preview=preview, view=view,
                      record_attention=record)
        controls = {"txt2img": shared, "img2img": dict(shared, image=img_in, strength=img_strength),
                    "depth2img": dict(shared, image=depth_in, strength=depth_strength, depth_map=depth_map)}
        # what a preset or an image's settings set: each field's control in every tab that has it, once
        setters = list({id(c): (name, c) for f in FIELDS.values() if f.kind != "image"
                        for name, c in ((f.name, controls[m][f.name]) for m in f.modes)}.values())

        def inputs(mode: str) -> dict:  # the API parameters, in FIELDS' order (gr.State is not one)
            return dict(runs=runs, model=model, **{f.name: controls[mode][f.name] for f in fields_of(mode)},
                        owner=owner)

        outputs = [dict(preview=live, gallery=gallery, final=final, status=status, info=info, tensors=tensors,
                        runs=runs, depth=depth_used)[name] for name in RunUpdate._fields]
        gpu = dict(concurrency_limit=spec.run_concurrency, concurrency_id="gpu", show_progress="hidden")
        inspector = Inspector(spec.anatomy, lim, lim.schedulers, models=view_of)
        timeline = [pick, other, scrub]
        # the token chips change only with the run shown, and only the overlay reads them: an event that
        # outputs them makes them wait for it (a click meanwhile is lost), and one that read them could
        # land after a newer choice and undo it
        inside = [update_note, update_row, *update_views, guidance_note, guidance_row, *guidance_views,
                  guidance_plot, attention_note, attention_box, token_grid]
        shown = dict(fn=lambda ids, p, o, step: (*inspector.timeline(store.views(ids), p, o, step),
                                                 *inspector.inside_updates(store.views(ids), p, step)),
                     inputs=[runs, pick, other, scrub],
                     outputs=[xt_view, x0_view, other_view, step_info, channels, schedule, *inside], **_private())
        overlaid = dict(fn=lambda ids, p, step, k: inspector.overlay_update(store.views(ids), p, step, k),
                        inputs=[runs, pick, scrub, token], outputs=[overlay], **_private())
        chips = dict(fn=lambda ids, p, k: inspector.token_chips(store.views(ids), p, k), inputs=[runs, pick, token],
                     outputs=[token], **_private())
        events = [
            go_txt.click(runner.handler("txt2img"), inputs_kwargs=inputs("txt2img"), outputs=outputs[:-1],
                         api_name="txt2img", **gpu),
            go_img.click(runner.handler("img2img"), inputs_kwargs=inputs("img2img"), outputs=outputs[:-1],
                         api_name="img2img", **gpu),
            go_depth.click(runner.handler("depth2img", with_depth=True), inputs_kwargs=inputs("depth2img"),
                           outputs=outputs, api_name="depth2img", **gpu),
        ]
        if spec.outputs is not None:  # the History panel, below Inspect: a reopened run joins `runs` as a run does
            history = History(spec.outputs, store, spec.private_history)
            events.append(history.render(demo, runs, owner, list(events), _private()))
        for event in events:
            event.then(lambda ids, o: inspector.refresh(store.views(ids), o), inputs=[runs, other], outputs=timeline,
                       **_private()).then(**chips).then(**shown).then(**overlaid)
        scrub.release(**shown).then(**overlaid)
        scrub.input(**shown, trigger_mode="always_last").then(**overlaid)
        pick.input(**chips).then(**shown).then(**overlaid)
        other.input(**shown)
        token.input(**overlaid)
        for kind, button in export_buttons.items():
            button.click(lambda ids, p, kind=kind: inspector.export_run(store.views(ids), p, kind), inputs=[runs, pick],
                         outputs=[download], **_private())
        tensors_button.click(lambda ids, p: inspector.tensors_file(store.views(ids), p), inputs=[runs, pick],
                             outputs=[download], **_private())
        prompt.change(inspector.tokens, inputs=[prompt, model], outputs=[tokens], trigger_mode="always_last",
                      **_private())
        demo.load(inspector.tokens, inputs=[prompt, model], outputs=[tokens], **_private())

        def load_settings(path: str | None, source: str | None) -> list:
            values, note = inspector.load_png(path, source)
            return [values.get(name, gr.skip()) for name, _ in setters] + [note]

        load_png.upload(load_settings, inputs=[load_png, model], outputs=[c for _, c in setters] + [load_note],
                        **_private())
        # the API's /stop is not queued; the page then says what it did through a queued event
        stop_said = gr.State()
        stop.click(runner.stop, outputs=[stop_said], api_name="stop", queue=False).then(
            gr.Info, inputs=[stop_said], **_private())

        private = _private()
        random_seed.click(lambda: -1, outputs=[seed], **private)
        reuse_seed.click(lambda ids: _last_seed(store.views(ids or [])), inputs=[runs], outputs=[seed], **private)
        to_img2img.click(lambda p: _send(p, "img2img"), inputs=[final], outputs=[img_in, tabs], **private)
        to_depth.click(lambda p: _send(p, "depth2img"), inputs=[final], outputs=[depth_in, tabs], **private)

        def apply_preset(name: str | None, source: str | None):
            presets = views[source].presets if source in views else spec.presets
            if not name or name not in presets:
                return [gr.skip()] * (len(setters) + 2)
            p = presets[name]
            return [p.values.get(key, gr.skip()) for key, _ in setters] + [gr.Tabs(selected=p.mode), p.description]

        preset.change(apply_preset, inputs=[preset, model], outputs=[c for _, c in setters] + [tabs, preset_note],
                      **private)

        if spec.models:
            labels = {source: label for label, source in spec.models}

            def pick_model(source: str, current: str | None) -> str:
                """Load the picked checkpoint; the session's model becomes it. On a load error the
                session stays on its model and the picker is set back to it (`.failure` below); only
                the invisible State is this event's output, so no control shows an error."""
                if source == current:
                    return gr.skip()
                try:
                    views[source] = spec.load_model(source)
                except (ModelLoadError, OSError, RuntimeError, ValueError) as err:
                    raise gr.Error(f"Could not load model {labels.get(source, source)!r}: {err}. This page stays on "
                                   f"{labels.get(current, current)!r}.", title="Model not loaded") from None
                return source

            def fit_controls(source: str) -> list:
                fit = _fitted(views[source])
                return [type(c)(**fit[key]) for key, c in fitted]

            # in the "gpu" group: a load waits for the run in progress, and a run for the load
            picked = picker.input(pick_model, inputs=[picker, model], outputs=[model], api_visibility="private",
                                  concurrency_limit=spec.run_concurrency, concurrency_id="gpu")
            picked.success(fit_controls, inputs=[model], outputs=[c for _, c in fitted], **private).then(
                inspector.tokens, inputs=[prompt, model], outputs=[tokens], **private)
            picked.failure(lambda source: source, inputs=[model], outputs=[picker], **private)
    runner.blocks = demo
    store.on_delete = lambda folder: _untrack(demo, folder)
    demo.run_store = store  # what the server keeps of runs: RunStore.usage() for tests and monitoring
    return demo


def _serve_as_is(root) -> None:
    """Have Gradio serve the run folders' files as they are (`gr.set_static_paths`). For each file in an
    update Gradio otherwise checks that it may serve it and that it is in its cache: 12 path resolutions
    a file, twice an update; about 0.14 s of CPU in a 20-step run of the bundled model, taken from the
    denoising thread through the GIL (BENCHMARKS.md, issue 21). The folders hold only what the runs made.

    Gradio tries its static paths in order, resolving the file and the path each time (an lstat a
    component), and enters two icons of its own at import; the root goes first, so that a file costs
    two resolutions rather than six (gradio 6.31's `_StaticFiles.all_paths`, pinned in requirements.txt;
    tests/test_app.py::test_the_run_folders_are_gradios_first_static_path fails if it changes)."""
    root = Path(root).resolve()
    if root not in _StaticFiles.all_paths:  # one list per process: each root once
        gr.set_static_paths([root])
    paths = _StaticFiles.all_paths
    paths.insert(0, paths.pop(paths.index(root)))


def _untrack(demo: gr.Blocks, folder) -> None:
    """Forget the paths of a deleted run folder's files in Gradio's per-component sets of
    files served (`Blocks.temp_file_sets`): its hourly sweep drops only the files it deletes
    itself, so every frame path ever served would stay there (about 50 kB a 150-step run)."""
    prefix = os.path.abspath(folder) + os.sep
    for files in demo.temp_file_sets:
        files.difference_update([path for path in list(files) if str(path).startswith(prefix)])


def _private() -> dict:
    # UI-only events: not part of the API. They go through the queue, since only queued events
    # bring gr.Info/gr.Warning and a gr.Error's message to the page (queue=False turns an error
    # into a bare HTTP 500 and drops the toasts), in their own group with no limit, so they
    # never wait behind a run in the "gpu" group.
    return dict(api_visibility="private", queue=True, concurrency_id="ui", concurrency_limit=None)


def _last_seed(runs: list):
    if not runs:
        gr.Warning("No run in this session yet: the seed stays as it is.")
        return gr.skip()
    return runs[-1].request.seed


def _send(final: str | None, tab: str):
    # an empty final must not clear the image already in that tab
    if not final:
        gr.Warning("No final image yet: generate one, then send it.")
        return gr.skip(), gr.skip()
    return final, gr.Tabs(selected=tab)


def _control(cls, name: str, lim: Limits, start: dict, **kwargs):
    """The control for run field `name`: its label, start value and bounds or choices from
    pipelines.request.FIELDS and `lim`; `kwargs` add to them or override them."""
    return cls(**_settings(name, lim, start, **kwargs))


def _settings(name: str, lim: Limits, start: dict, **kwargs) -> dict:
    """`_control`'s keyword arguments for run field `name`."""
    f = FIELDS[name]
    if f.kind in ("int", "float"):
        kwargs = dict(zip(("minimum", "maximum"), f.bounds(lim))) | kwargs
    elif f.kind == "choice":
        kwargs = {"choices": list(getattr(lim, f.choices))} | kwargs
    return {"label": f.label, "value": start.get(name, f.default), **kwargs}


def _start(view: ModelView) -> dict:
    """Start values for `view`'s model: its own defaults, and its start preset's over them."""
    return {**view.defaults, **(view.presets[view.preset].values if view.preset in view.presets else {})}


def _fitted(view: ModelView) -> dict[str, dict]:
    """The settings of every control that depends on the model, for `view`'s: keyword arguments to
    build it with, or to update it with when a session picks that model. Bounds, steps and choices
    come from its `Limits`; start values from its defaults and start preset."""
    lim, start = view.limits, _start(view)
    mode = start.get("mode", "txt2img")
    guidance = dict(label="Distilled guidance (an input of the model, not CFG)",
                    info=f"{lim.family} has no classifier-free guidance: the model takes this value as an input"
                    ) if lim.distilled_guidance else dict(info=None)
    side = dict(step=lim.size_multiple, info=f"a multiple of {lim.size_multiple}")
    return {
        "header": dict(value=f"# Stepwise\nEvery denoising step, as it happens. Model: **{view.label}**"),
        "untrained": dict(visible=view.untrained),
        "negative_prompt": dict(visible=lim.negative_prompt),  # the user's text stays as it is
        "tabs": dict(selected=mode if mode in lim.modes else lim.modes[0]),
        **{f"mode:{m}": dict(visible=m in lim.modes) for m in MODES},
        **{f"note:{m}": dict(value=_mode_note(view, m), visible=m not in lim.modes) for m in MODES},
        **{f"send:{m}": dict(visible=m in lim.modes) for m in MODES[1:]},
        "steps": _settings("steps", lim, start, step=1),
        "guidance_scale": _settings("guidance_scale", lim, start, step=0.5, **guidance),
        "width": _settings("width", lim, start, value=start.get("width", lim.min_side), **side),
        "height": _settings("height", lim, start, value=start.get("height", lim.min_side), **side),
        "scheduler": _settings("scheduler", lim, start, value=start.get("scheduler", lim.schedulers[0]),
                               info=_scheduler_note(lim) or None),
        "preview": _settings("preview", lim, start,
                             info=" · ".join(f"{mode}: {PREVIEW_INFO[mode]}" for mode in lim.preview_modes)),
        "view": _settings("view", lim, start, value=start.get("view", "x0"), info=VIEW_INFO),
        "preset": dict(choices=[(p.title, name) for name, p in view.presets.items()], value=view.preset,
                       visible=bool(view.presets)),
        "preset_note": dict(value=view.presets[view.preset].description if view.preset in view.presets else ""),
    }


def _mode_note(view: ModelView, mode: str) -> str:
    """Why `mode`'s tab has no Generate button for this model, and what to do; empty where it runs."""
    lim = view.limits
    if mode in lim.modes:
        return ""
    hint = lim.unavailable_modes.get(mode)
    return (f"**{view.label}** ({lim.family}) runs {', '.join(lim.modes)}, not {mode}: pick another model"
            + (f", or {hint}." if hint else "."))


def _scheduler_note(lim: Limits) -> str:
    """Which samplers this model does not offer, and why (txt2img's menu is the dropdown's)."""
    unfit = lim.unfit_schedulers
    parts = [f"{name}: {why}" for name, why in unfit.get("txt2img", {}).items()]
    for mode in ("img2img", "depth2img"):
        parts += [f"{name} (not in {mode}): {why}" for name, why in unfit.get(mode, {}).items()
                  if name not in unfit.get("txt2img", {})]
    return "Not offered for this model: " + " · ".join(parts) if parts else ""


