"""The Blocks layout. Building it loads no model and starts nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import gradio as gr

from pipelines import Limits
from pipelines.request import FIELDS, fields_of
from pipelines.presets import Preset

from . import fields
from .events import GenerateFn, Runner, RunUpdate
from .inspect import Inspector
from .stream import MB, RunStore

CSS = """
.sw-progress { display: flex; gap: .75em; align-items: center; font-variant-numeric: tabular-nums; }
.sw-progress progress { flex: 1; height: .9em; }
.sw-schedule { width: 100%; max-width: 520px; height: auto; font: 11px sans-serif; }
.sw-schedule .curve { fill: none; stroke: #f97316; stroke-width: 2; }
.sw-schedule .axis { stroke: #888; } .sw-schedule .now { stroke: #2563eb; fill: #2563eb; }
.sw-schedule text { fill: currentColor; }
.sw-token { display: inline-block; margin: 2px; padding: 0 4px; border: 1px solid #ccc; border-radius: 4px; }
.sw-token sub { color: #888; margin-left: 2px; } .sw-token.cut { text-decoration: line-through; opacity: .5; }
/* step captions: one small line at the thumbnail's foot, not a label over half of it */
#steps-gallery .caption-label { font-size: 10px; padding: 0 4px; max-width: 100%; opacity: .85; }
/* frames can be latent-sized (64x64 for SD): scale them up, keep the pixels crisp */
#live-preview img, #final-image img, #depth-used img, #steps-gallery img, [id^="timeline-"] img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""


PREVIEW_INFO = ("latent-rgb: a linear map of the latent channels, free, latent-sized · tiny-vae: a small "
                "decoder, near-exact, cheap · full-vae: the model's own VAE, exact, costs about a step")
VIEW_INFO = "x_t: the noisy latent the sampler holds at this step · x0: the clean image the model predicts from it"
IDLE_STATUS = '<div class="sw-progress"><span>Ready: press Generate to watch every step.</span></div>'


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


def build_app(spec: AppSpec) -> gr.Blocks:
    memory_runs, memory_bytes = spec.run_memory
    store = RunStore(spec.run_root, keep=spec.keep_runs, memory_runs=memory_runs, memory_bytes=memory_bytes)
    runner = Runner(spec.generate, store, spec.limits, spec.model_label)
    start = {**spec.defaults, **(spec.presets[spec.initial_preset].values if spec.initial_preset else {})}
    lim = spec.limits

    with gr.Blocks(title="Stepwise: watch Stable Diffusion work", delete_cache=spec.delete_cache) as demo:
        gr.Markdown(f"# Stepwise\nEvery denoising step, as it happens. Model: **{spec.model_label}**")
        if spec.untrained:
            gr.Markdown(
                "> **Untrained model.** This checkpoint has random weights built from configs, so its "
                "pictures are noise. Use the bundled micro model or pass `--model`.",
                elem_id="untrained-banner",
            )
        # this session's run ids (keys of `store`), newest last; API sessions never close,
        # so the runs are let go `session_ttl` after the last one
        runs = gr.State([], time_to_live=spec.session_ttl, delete_callback=store.forget)
        with gr.Row():
            with gr.Column(scale=2):
                prompt = _control(gr.Textbox, "prompt", lim, start, lines=2, elem_id="prompt")
                tokens = gr.HTML(elem_id="tokens")
                negative = _control(gr.Textbox, "negative_prompt", lim, start)
                with gr.Tabs(selected=start.get("mode", "txt2img")) as tabs:
                    with gr.Tab("txt2img", id="txt2img"):
                        go_txt = gr.Button("Generate", variant="primary", elem_id="generate-txt2img")
                    with gr.Tab("img2img", id="img2img"):
                        img_in = fields.ImageFile(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                                 elem_id="img2img-input")
                        img_strength = fields.Slider(0.01, 1.0, value=start.get("strength", 0.75), step=0.01,
                                                 label="Strength (how much to change)")
                        go_img = gr.Button("Generate", variant="primary", elem_id="generate-img2img")
                    with gr.Tab("depth", id="depth2img"):
                        with gr.Row():
                            depth_in = fields.ImageFile(label="Input image", type="filepath",
                                                       sources=["upload", "clipboard"], elem_id="depth-input")
                            depth_map = fields.ImageFile(label="Depth map (optional; estimated when empty)",
                                                         type="filepath", sources=["upload"])
                        depth_strength = fields.Slider(0.01, 1.0, value=start.get("strength", 0.8), step=0.01,
                                                   label="Strength")
                        go_depth = gr.Button("Generate", variant="primary", elem_id="generate-depth2img")
                        depth_used = gr.Image(label="Depth map used (near = light)", interactive=False, height=160,
                                              elem_id="depth-used")
                with gr.Group():
                    with gr.Row():
                        seed = _control(fields.Number, "seed", lim, start, value=start.get("seed", -1), precision=0,
                                        scale=4, elem_id="seed")
                        # text, not emoji: a stock Chromium without emoji fonts draws those as boxes
                        random_seed = gr.Button("Random", scale=0, min_width=80, size="sm", elem_id="seed-random")
                        reuse_seed = gr.Button("Last run's", scale=0, min_width=96, size="sm", elem_id="seed-reuse")
                    steps = _control(fields.Slider, "steps", lim, start, step=1, elem_id="steps")
                    guidance = _control(fields.Slider, "guidance_scale", lim, start, step=0.5, elem_id="guidance")
                    with gr.Row():
                        width = _control(fields.Slider, "width", lim, start, value=start.get("width", lim.min_side),
                                         step=8)
                        height = _control(fields.Slider, "height", lim, start, value=start.get("height", lim.min_side),
                                          step=8)
                    scheduler = _control(fields.Dropdown, "scheduler", lim, start, value=start.get(
                        "scheduler", lim.schedulers[0]), info=_scheduler_note(lim) or None)
                    with gr.Row():
                        preview = _control(fields.Radio, "preview", lim, start, info=PREVIEW_INFO)
                        view = _control(fields.Radio, "view", lim, start, value=start.get("view", "x0"), info=VIEW_INFO)
                    preset = fields.Dropdown([(p.title, name) for name, p in spec.presets.items()],
                                         value=spec.initial_preset, label="Preset", visible=bool(spec.presets))
                    preset_note = gr.Markdown(_preset_note(spec, spec.initial_preset))
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
                with gr.Row():
                    to_img2img = gr.Button("Send to img2img", elem_id="send-img2img")
                    to_depth = gr.Button("Send to depth", elem_id="send-depth")
                gallery = gr.Gallery(label="Every step", columns=6, height="auto", object_fit="contain",
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
                channels = gr.Gallery(label="The 4 latent channels of x_t", columns=4, height=160,
                                      elem_id="timeline-channels")
                schedule = gr.HTML(elem_id="timeline-schedule")
            with gr.Row():
                export_buttons = {kind: gr.Button(f"Download {label}", elem_id=f"export-{kind}") for kind, label in
                                  (("gif", "GIF"), ("webp", "WebP"), ("mp4", "MP4"), ("zip", "PNGs (zip)"))}
                download = gr.File(label="Download", elem_id="export-file", height=90)

        # each run field's control in each mode's tab (one shared by all tabs, or the tab's own)
        shared = dict(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, guidance_scale=guidance,
                      width=width, height=height, scheduler=scheduler, preview=preview, view=view)
        controls = {"txt2img": shared, "img2img": dict(shared, image=img_in, strength=img_strength),
                    "depth2img": dict(shared, image=depth_in, strength=depth_strength, depth_map=depth_map)}
        # what a preset or an image's settings set: each field's control in every tab that has it, once
        setters = list({id(c): (name, c) for f in FIELDS.values() if f.kind != "image"
                        for name, c in ((f.name, controls[m][f.name]) for m in f.modes)}.values())

        def inputs(mode: str) -> dict:  # the API parameters, in FIELDS' order (gr.State is not one)
            return dict(runs=runs, **{f.name: controls[mode][f.name] for f in fields_of(mode)})

        outputs = [dict(preview=live, gallery=gallery, final=final, status=status, info=info, runs=runs,
                        depth=depth_used)[name] for name in RunUpdate._fields]
        gpu = dict(concurrency_limit=1, concurrency_id="gpu", show_progress="hidden")
        inspector = Inspector(spec.anatomy, lim, lim.schedulers)
        timeline = [pick, other, scrub]
        shown = dict(fn=lambda ids, p, o, step: inspector.timeline(store.views(ids), p, o, step),
                     inputs=[runs, pick, other, scrub],
                     outputs=[xt_view, x0_view, other_view, step_info, channels, schedule], **_private())
        events = [
            go_txt.click(runner.handler("txt2img"), inputs_kwargs=inputs("txt2img"), outputs=outputs[:-1],
                         api_name="txt2img", **gpu),
            go_img.click(runner.handler("img2img"), inputs_kwargs=inputs("img2img"), outputs=outputs[:-1],
                         api_name="img2img", **gpu),
            go_depth.click(runner.handler("depth2img", with_depth=True), inputs_kwargs=inputs("depth2img"),
                           outputs=outputs, api_name="depth2img", **gpu),
        ]
        for event in events:
            event.then(lambda ids, o: inspector.refresh(store.views(ids), o), inputs=[runs, other], outputs=timeline,
                       **_private()).then(**shown)
        scrub.release(**shown)
        scrub.input(**shown, trigger_mode="always_last")
        pick.input(**shown)
        other.input(**shown)
        for kind, button in export_buttons.items():
            button.click(lambda ids, p, kind=kind: inspector.export_run(store.views(ids), p, kind), inputs=[runs, pick],
                         outputs=[download], **_private())
        prompt.change(inspector.tokens, inputs=[prompt], outputs=[tokens], trigger_mode="always_last", **_private())
        demo.load(inspector.tokens, inputs=[prompt], outputs=[tokens], **_private())
        def load_settings(path: str | None) -> list:
            values, note = inspector.load_png(path)
            return [values.get(name, gr.skip()) for name, _ in setters] + [note]

        load_png.upload(load_settings, inputs=[load_png], outputs=[c for _, c in setters] + [load_note], **_private())
        stop.click(runner.stop, api_name="stop", queue=False)

        private = _private()
        random_seed.click(lambda: -1, outputs=[seed], **private)
        reuse_seed.click(lambda ids: _last_seed(store.views(ids or [])), inputs=[runs], outputs=[seed], **private)
        to_img2img.click(lambda p: _send(p, "img2img"), inputs=[final], outputs=[img_in, tabs], **private)
        to_depth.click(lambda p: _send(p, "depth2img"), inputs=[final], outputs=[depth_in, tabs], **private)

        def apply_preset(name: str | None):
            if not name:
                return [gr.skip()] * (len(setters) + 2)
            p = spec.presets[name]
            return [p.values.get(key, gr.skip()) for key, _ in setters] + [gr.Tabs(selected=p.mode),
                                                                            _preset_note(spec, name)]

        preset.change(apply_preset, inputs=[preset], outputs=[c for _, c in setters] + [tabs, preset_note], **private)
    runner.blocks = demo
    store.on_delete = lambda folder: _untrack(demo, folder)
    demo.run_store = store  # what the server keeps of runs: RunStore.usage() for tests and monitoring
    return demo


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
    f = FIELDS[name]
    if f.kind in ("int", "float"):
        kwargs = dict(zip(("minimum", "maximum"), f.bounds(lim))) | kwargs
    elif f.kind == "choice":
        kwargs = {"choices": list(getattr(lim, f.choices))} | kwargs
    return cls(**{"label": f.label, "value": start.get(name, f.default), **kwargs})


def _scheduler_note(lim: Limits) -> str:
    """Which samplers this model does not offer, and why (txt2img's menu is the dropdown's)."""
    unfit = lim.unfit_schedulers
    parts = [f"{name}: {why}" for name, why in unfit.get("txt2img", {}).items()]
    for mode in ("img2img", "depth2img"):
        parts += [f"{name} (not in {mode}): {why}" for name, why in unfit.get(mode, {}).items()
                  if name not in unfit.get("txt2img", {})]
    return "Not offered for this model: " + " · ".join(parts) if parts else ""


def _preset_note(spec: AppSpec, name: str | None) -> str:
    if not name:
        return ""
    return spec.presets[name].description
