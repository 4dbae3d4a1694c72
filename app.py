"""Stepwise: watch Stable Diffusion work, one denoising step at a time.

    python app.py [--model SRC] [--models-dir DIR] [--config SRC] [--depth-model SRC] [--controlnet SRC]
                  [--depth-estimator SRC]
                  [--device cuda|mps|cpu] [--dtype fp16|bf16|fp32] [--offload model|sequential] [--compile]
                  [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS] [--preset NAME]
                  [--outputs DIR | --no-save] [--outputs-max-gb N] [--shared-history]
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline-first: no phoning home
# CPU: idle OpenMP workers sleep instead of spinning, so the threads that decode and
# stream frames are not starved between UNet ops (see BENCHMARKS.md). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pipelines.quiet import quiet_imports, quiet_runs  # noqa: E402 - imports no library

quiet_imports()

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from pipelines import BUNDLED, GenerationError, ModelCache, ModelLoadError, generate, layout  # noqa: E402
from pipelines.anatomy import Anatomy  # noqa: E402
from pipelines.cache import OFFLOAD, bundled_folder  # noqa: E402
from pipelines.devices import app_cpu_threads  # noqa: E402
from pipelines.outputs import GB, OutputsFolder  # noqa: E402
from pipelines.presets import Preset, PresetError, fitting_presets, load_presets  # noqa: E402
from pipelines.sources import is_single_file, list_models  # noqa: E402
from ui import CSS, AppSpec, ModelView, build_app  # noqa: E402

log = logging.getLogger("stepwise")

MAX_QUEUE = 16  # waiting runs beyond this are refused with "queue full"
MAX_UPLOAD = "20mb"
KEEP_RUNS = 32  # run folders of step frames kept on disk; older ones are deleted
# Runs whose steps stay in memory for the Inspect timeline, and their bytes in all; a session
# may hold half. A 512x512 full-VAE step holds about 1.7 MB (its pixels as array and image,
# 64x64x4 float32 latents and x0), so 1 GB is about 20 such 30-step runs.
RUN_MEMORY = (16, 1024 * 2**20)
CACHE_SWEEP = (3600, 3600)  # Gradio's own cache: every hour, delete files older than an hour
SESSION_TTL = CACHE_SWEEP[1]  # a session's runs go with its files: an hour after its last run
# Sessions whose Gradio state (every component's config, the run ids) stays in memory, least
# recently used dropped first: about 250 kB each here (measured), so Gradio's default of
# 10000 would be 2.5 GB. Every gradio_client or /gradio_api/call/ client is a new session.
MAX_SESSIONS = 256
DEFAULT_OUTPUTS = Path(__file__).resolve().parent / "outputs"  # --outputs' default: beside the app, as A1111's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="diffusers folder, hub repo id or single .safetensors/.ckpt checkpoint file "
                        "(default: the first model of --models-dir, else the bundled micro model)")
    p.add_argument("--models-dir", default=None,
                   help="folder of models to pick from: diffusers folders and .safetensors/.ckpt files")
    p.add_argument("--config", default=None,
                   help="diffusers folder or hub repo id whose configs describe single-file checkpoints "
                        "(default: the repo diffusers names for the file's architecture, from the HF cache)")
    p.add_argument("--depth-model", default=None,
                   help="depth checkpoint, e.g. stabilityai/stable-diffusion-2-depth (default: --model's depth UNet)")
    p.add_argument("--controlnet", default=None,
                   help="depth ControlNet folder or hub id for the depth tab of SD 1.x, SDXL and SD 3 models, e.g. "
                        "lllyasviel/control_v11f1p_sd15_depth, diffusers/controlnet-depth-sdxl-1.0, "
                        "stabilityai/stable-diffusion-3.5-large-controlnet-depth")
    p.add_argument("--depth-estimator", default=None,
                   help="transformers depth estimator (DPT, Depth Anything) folder or hub id that makes the depth "
                        "map when none is uploaded, e.g. depth-anything/Depth-Anything-V2-Small-hf "
                        "(default: the model folder's depth_estimator/)")
    p.add_argument("--tiny-vae", default=None, help="AutoencoderTiny folder or repo id for the tiny-vae preview")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--same-process", action="store_true",
                   help="on a CPU, generate in the server's own process (default: in a child process, so the "
                        "denoiser does not share Python's GIL with the server; the child holds a second copy "
                        "of the model in memory)")
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, else fp32)")
    p.add_argument("--offload", choices=OFFLOAD, default=None,
                   help="CUDA: keep weights in CPU memory and move each model (model) or layer (sequential) to the "
                        "GPU when it runs, so Flux and SD 3.5 fit a 16-24 GB card (accelerate)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPUs; the first run compiles)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--auth", default=None, help="USER:PASS required to open the app")
    p.add_argument("--preset", default=None, help="preset to start with (file stem in presets/)")
    saving = p.add_mutually_exclusive_group()
    saving.add_argument("--outputs", default=None, metavar="DIR",
                        help="folder where every run is saved (final PNG, steps, tensors) and the History reads "
                             "(default: outputs/ beside app.py, created by the first run)")
    saving.add_argument("--no-save", action="store_true",
                        help="save nothing: runs live only in Gradio's cache (an hour), and there is no History")
    p.add_argument("--outputs-max-gb", type=float, default=None, metavar="N",
                   help="keep the outputs folder under N GB: the oldest runs' steps are deleted first, "
                        "their final images last (default: no bound)")
    p.add_argument("--shared-history", action="store_true",
                   help="on a shared deployment (--share, a Hugging Face Space) every user sees every saved run "
                        "in the History (default there: each user sees only their own)")
    scale = p.add_argument_group("scale-out on Ray Serve (pip install 'ray[serve]==2.60.0')")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run generation on N Ray Serve replicas, each with its own copy of the model: on this "
                            "machine (a local Ray is started), or on --ray-address's cluster")
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run generation on an existing Ray cluster, e.g. auto or ray://HEAD:10001; replicas: "
                            "--workers, else one per GPU of the cluster (per CPU when it has none)")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


def model_menu(args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The checkpoint picker: (label, source) of --model and every model of --models-dir, the start
    model first, and `{name: reason}` for the --models-dir entries that cannot load. Raises
    ModelLoadError when --models-dir is not a folder or has no model and --model is not given."""
    if not args.models_dir:
        return [(args.model or BUNDLED, args.model or BUNDLED)], {}
    entries, broken = list_models(args.models_dir, args.config)
    for name, reason in broken.items():
        log.warning("--models-dir: %s cannot load: %s", name, reason)
    choices = [(e.label, e.source) for e in entries]
    if args.model is None and not choices:
        raise ModelLoadError(f"--models-dir {args.models_dir!r} has no model that loads"
                             + "".join(f"\n  {name}: {reason}" for name, reason in broken.items()))
    if args.model is not None and args.model not in (src for _, src in choices):
        choices.insert(0, (args.model, args.model))
    return choices, broken


def model_view(cache: ModelCache, source: str, label: str | None = None, depth_model: str | None = None) -> ModelView:
    """Load `source` (through `cache`: under its budget, least recently used out) and say what the
    app offers for it. Raises ModelLoadError."""
    checkpoint = cache.checkpoint(source)
    limits = checkpoint.limits()
    if depth_model:  # depth2img runs on its own checkpoint
        limits = dataclasses.replace(limits, modes=(*(m for m in limits.modes if m != "depth2img"), "depth2img"),
                                     unavailable_modes={m: why for m, why in limits.unavailable_modes.items()
                                                        if m != "depth2img"})
    folder = bundled_folder() if source == BUNDLED else Path(source)
    card = _model_card(folder) if folder.is_dir() else {}
    presets = fitting_presets(load_presets(), limits, checkpoint.native_side)
    return ModelView(source=source, label=card.get("label") or label or source,
                     untrained=folder.is_dir() and layout.is_untrained(folder),
                     limits=limits, defaults=_model_defaults(checkpoint, card),
                     presets=presets, card=card, preset=_default_preset(presets))


def outputs_folder(args: argparse.Namespace) -> OutputsFolder | None:
    """Where runs are saved: --outputs, else DEFAULT_OUTPUTS; None with --no-save. Raises ValueError
    for an --outputs-max-gb that is not a positive number."""
    if args.outputs_max_gb is not None and not args.outputs_max_gb > 0:
        raise ValueError(f"--outputs-max-gb must be a positive number of GB, got {args.outputs_max_gb}")
    if args.no_save:
        return None
    max_bytes = int(args.outputs_max_gb * GB) if args.outputs_max_gb is not None else None
    return OutputsFolder(Path(args.outputs) if args.outputs else DEFAULT_OUTPUTS, max_bytes)


def shared_deployment(args: argparse.Namespace) -> bool:
    """Whether strangers may use this server: a public share link, or a Hugging Face Space (SPACE_ID)."""
    return args.share or bool(os.environ.get("SPACE_ID"))


def create_demo(args: argparse.Namespace, cache: ModelCache, workers=None) -> gr.Blocks:
    """Build the app around `cache`, fitted to the start checkpoint (`--model`, else the first of
    `--models-dir`): it is loaded here (so the first click is fast), and the size limits, preview
    decoders, scheduler menu and presets offered come from it. Runs are saved in `outputs_folder(args)`.
    With `workers` (`pipelines.workers.Workers`, or `pipelines.child.GenerationProcess`) runs go to
    its replicas or child process, `workers.concurrency` at once, and `cache` describes the models
    (and decodes the pictures a child process left for later).
    Raises ModelLoadError, PresetError or ValueError (a bad --outputs-max-gb)."""
    outputs = outputs_folder(args)
    choices, broken = model_menu(args)
    label, start = choices[0]
    view = model_view(cache, start, label, args.depth_model)
    limits, card, presets = view.limits, view.card, view.presets
    preset = args.preset or view.preset
    if preset is not None and preset not in presets:
        raise PresetError(f"--preset {preset!r} is unknown or does not fit {start!r}; "
                          f"choose one of {', '.join(presets) or '(none fit this model)'}")
    depth_source = args.depth_model or start
    if args.controlnet or args.depth_model:  # a depth route that cannot run is refused now, where it was given
        cache.pipeline("depth2img", depth_source)
    if args.config and not any(is_single_file(source) for _, source in choices):
        log.warning("--config %r is for single-file checkpoints; %s loads from its own configs", args.config, start)
    sources = {src for _, src in choices}

    def run(request, token, model: str | None = None):
        """One run on `model` (a source of the picker; default: the start model)."""
        model = model or start
        if model not in sources:
            raise GenerationError(f"model {model!r} is not in the model list; pick one of the list")
        source = depth_source if request.mode == "depth2img" and args.depth_model else model
        if workers is not None:
            return workers.generate(request, token, source)
        # on a CPU each page update decodes the picture it shows (`RunView.write_newest`), so the run makes none
        return generate(request, cache, token, source=source, live=False)

    spec = AppSpec(
        generate=run,
        model_label=view.label,
        untrained=view.untrained,
        run_root=str(Path(gr.utils.get_upload_folder()) / "stepwise-runs"),
        limits=limits,
        defaults=view.defaults,
        presets=presets,
        initial_preset=preset,
        examples=card.get("example_prompts", []),
        vocabulary=card.get("vocabulary", {}),
        keep_runs=KEEP_RUNS,
        run_memory=RUN_MEMORY,
        session_ttl=SESSION_TTL,
        anatomy=Anatomy(start, args.depth_model, config=args.config),
        delete_cache=CACHE_SWEEP,
        source=start,
        # the checkpoint picker: only with --models-dir (A1111's); each pick loads through `cache`
        models=choices if args.models_dir else [],
        broken=broken,
        load_model=lambda source: model_view(cache, source, dict((s, l) for l, s in choices).get(source),
                                             args.depth_model),
        outputs=outputs,
        private_history=shared_deployment(args) and not args.shared_history,
        run_concurrency=workers.concurrency if workers is not None else 1,
    )
    return build_app(spec).queue(max_size=MAX_QUEUE, default_concurrency_limit=1)


def _model_defaults(checkpoint, card: dict) -> dict:
    """Start values for a model no preset fits: its native size, and the view that shows the
    most for what it costs. x0 is computed every step anyway, so it is free and shows the
    picture forming; the tiny VAE is near-exact at a fraction of a step. The model card may
    name its own (the micro model's full VAE costs about one step, on the decode thread)."""
    side, family = checkpoint.native_side, checkpoint.family
    preview = "tiny-vae" if checkpoint.tiny_vae is not None else "latent-rgb"
    return {"width": side, "height": side, "view": "x0", "preview": preview, "steps": family.default_steps,
            "guidance_scale": family.default_guidance, "scheduler": family.default_scheduler,
            **{k: card[k] for k in ("steps", "guidance_scale", "scheduler", "preview", "view") if k in card}}


def _default_preset(presets: dict[str, Preset]) -> str | None:
    """The first txt2img preset that fits the model, if any."""
    return next((name for name, p in presets.items() if p.mode == "txt2img"), None)


def _model_card(folder: Path) -> dict:
    """The bundled model's settings file (example prompts, vocabulary), if any."""
    card = layout.read_card(folder)
    if layout.is_untrained(folder):
        # the folder's name tells one tiny test model from another (in the picker, info line and PNG)
        card.setdefault("label", f"untrained tiny model {folder.name!r} (random weights)")
    elif folder.resolve() == layout.BUNDLED_FOLDER:
        card.setdefault("label", "bundled micro model")
    return card


def launch_options(host: str, port: int, auth: tuple[str, str] | None = None) -> dict:
    """Safe defaults for `Blocks.launch`, shared by main() and the tests."""
    # quiet: serve() prints the one line that matters (Gradio's own hint names share=True, not --share)
    return dict(server_name=host, server_port=port, auth=auth, max_file_size=MAX_UPLOAD, show_error=True,
                enable_monitoring=False, css=CSS, state_session_capacity=MAX_SESSIONS, quiet=True)


def serve(args: argparse.Namespace, app: gr.Blocks) -> None:
    """Launch with the safe defaults; a share link that cannot open leaves the app serving locally."""
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if auth and len(auth) != 2:
        sys.exit("error: --auth takes USER:PASS")
    if args.share:
        log.warning("--share makes a PUBLIC link: anyone with it can use this machine. Add --auth USER:PASS.")
    launch = launch_options(args.host, args.port, auth)
    saved = "; --no-save: runs are not saved" if args.no_save else (
        f"; saving runs in {Path(args.outputs) if args.outputs else DEFAULT_OUTPUTS}")
    print(f"Stepwise serving on http://{args.host}:{args.port}" + ("" if args.share else " (--share for a public link)")
          + saved, flush=True)
    try:
        app.launch(share=args.share, **launch)
    except Exception as err:  # noqa: BLE001 - only the share tunnel gets a second chance
        if not args.share:
            raise
        log.error("could not open a share link (%s); serving on %s:%d only", err, args.host, args.port)
        app.launch(share=False, **launch)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, load the model, build the app and serve it. Importing app.py does none of this."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    quiet_runs()
    args = parse_args(argv)
    options = dict(device=args.device, dtype=args.dtype, tiny_vae=args.tiny_vae, compile_unet=args.compile,
                   offload=args.offload, single_file_config=args.config, controlnet=args.controlnet,
                   depth_estimator=args.depth_estimator)
    workers = child = None
    try:
        if args.workers or args.ray_address:
            workers = start_workers(args, options)
            # the replicas generate; this process's copy (CPU, the same configs) only describes the models
            options = dict(options, device="cpu", dtype=None, compile_unet=False, offload=None)
        cache = ModelCache(**options)
        if cache.device.type == "cpu":
            torch.set_num_threads(app_cpu_threads())
            if workers is None and not args.same_process:
                workers = child = start_child(args, options, cache)
        demo = create_demo(args, cache, workers)
    except (ModelLoadError, PresetError, GenerationError, ValueError) as err:
        if child is not None:
            child.shutdown()
        sys.exit(f"error: {err}")
    try:
        serve(args, demo)
    finally:
        if child is not None:
            child.shutdown()


def start_child(args: argparse.Namespace, cache_options: dict, cache: ModelCache):
    """On a CPU, generation in a child process (`pipelines.child`) that loads the start model while this
    process does; the pictures a run leaves for later are made here, by `cache`'s decoders."""
    from pipelines.child import GenerationProcess

    choices, _ = model_menu(args)
    child = GenerationProcess(cache_options, app_cpu_threads(), preload=choices[0][1],
                              decoder=lambda source, preview: cache.checkpoint(source).decoder(preview))
    atexit.register(child.shutdown)  # main() ends it too; this is for a caller that does not
    return child


def start_workers(args: argparse.Namespace, cache_options: dict):
    """`--workers` / `--ray-address`: the Ray Serve replicas (`pipelines.workers`); Ray is imported only here.
    Exits with what to install when Ray is missing; raises GenerationError when it cannot start."""
    try:
        from pipelines import workers
    except ImportError as err:
        sys.exit(f"error: --workers and --ray-address need Ray Serve ({err}): pip install 'ray[serve]==2.60.0'")
    started = workers.Workers(cache_options, replicas=args.workers, address=args.ray_address)
    atexit.register(started.shutdown)  # on a cluster the replicas would outlive this process
    return started


if __name__ == "__main__":
    main()
