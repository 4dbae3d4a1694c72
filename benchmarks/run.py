"""Stepwise benchmarks: what watching every step costs.

    python -m benchmarks.run [--model bundled] [--steps 20] [--repeats 7] [--json benchmarks/results.json]

Prints a table and writes JSON. Every figure is a median over `--repeats` runs, and
every comparison is measured side by side, interleaved, in this one process.
1. streaming: the app's generation path (each step stored as a frame, the newest one's picture
   decoded at the page's update pace) vs the bare diffusers call with no callback, same model,
   settings and seed: to the final image, and to every picture of the run made (on a CPU those no
   update showed come after the final image).
   With it, the step callback's own time per step on the denoising thread.
2. server: Gradio's per-yield work (handler + postprocess) as runs grow.
3. cache: img2img after txt2img; switching between two checkpoints under a budget.
4. gpu: full-size SD 1.5 / SD 2-depth architectures with random weights (CUDA);
   on CPU it runs the same code at a reduced size to prove it works.
End to end through a served app and gradio_client: `python -m benchmarks.e2e`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it, before torch loads

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr
import torch

from pipelines import Limits, ModelCache, generate, layout, validate_request
from pipelines.cache import BUNDLED, bundled_folder
from pipelines.generate import _per_run, pipeline_inputs
from pipelines.schedulers import make_scheduler
from pipelines.tiny import save_tiny_checkpoint
from ui.events import UPDATE_INTERVAL
from ui.layout import AppSpec, build_app
from ui.stream import RunView

from .callback import timed_callback, wrapped_step_callbacks
from .gpu import gpu_section


def bare_run(cache: ModelCache, req, source: str):
    """The family's diffusers pipeline called as its docs show: no callback, the request's sampler
    (flow-matching Euler for SD 3 and Flux), seed and inputs."""
    shared, family = cache.pipeline(req.mode, source), cache.checkpoint(source).family
    pipe = _per_run(shared, make_scheduler(req.scheduler, shared.scheduler.config, family.flow_matching))
    return pipe(req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                generator=torch.Generator().manual_seed(req.seed), **pipeline_inputs(pipe, req)).images[0]


def app_run(cache: ModelCache, req, source: str, folder: Path, marks: dict | None = None):
    """The app's path, as `ui.events.Runner` takes it: a run that makes no picture as it goes
    (`generate(live=False)`; on CUDA every picture is made anyway, on the side stream), every step
    stored, and at most once per `UPDATE_INTERVAL` the newest step's picture decoded and written
    (`RunView.write_newest`), as each page update does. Returns once every picture of the run is made, as
    the outputs folder saves them, so none of its work spills into what runs next; `marks["final"]`,
    when given: the perf_counter() time the final image came."""
    view, shown = RunView(folder), float("-inf")
    for item in generate(req, cache, source=source, live=False):
        if hasattr(item, "step"):
            view.add_frame(item)
            if time.monotonic() - shown >= UPDATE_INTERVAL:
                shown = time.monotonic()
                view.write_newest()
        elif marks is not None:
            marks["final"] = time.perf_counter()
    view.complete()
    for frame in view.frames:
        for copy in frame.decoded:
            copy.tensor()
    return view


def callback_section(source, base: dict, repeats: int, previews: list[str]) -> list[dict]:
    """The step callback's own time per step on the denoising thread, the app's way (decode thread),
    for each preview: median and 90th percentile over every step of `repeats` runs after a warm-up."""
    cache = ModelCache(device="cpu")
    rows = []
    for preview in previews:
        req = validate_request(dict(base, preview=preview, view="x0"))
        times: list[float] = []
        with wrapped_step_callbacks(timed_callback(times)):
            app_run(cache, req, source, Path(tempfile.mkdtemp()))  # warm-up
            times.clear()
            for _ in range(repeats):
                app_run(cache, req, source, Path(tempfile.mkdtemp()))
        times.sort()
        rows.append({"preview": preview, "calls": len(times), "callback_us_median": 1e6 * statistics.median(times),
                     "callback_us_p90": 1e6 * times[int(0.9 * (len(times) - 1))]})
    return rows


def streaming_section(source, base: dict, repeats: int, previews: list[str]) -> list[dict]:
    """Bare call vs the app path for each preview and view, decoding inline and on
    a decode thread, all interleaved in one loop."""
    caches = {"inline": ModelCache(device="cpu", overlap_decode=False),
              "thread": ModelCache(device="cpu", overlap_decode=True)}
    configs = [(p, v, how) for p in previews for v in ("x_t", "x0") for how in caches]
    reqs = {c: validate_request(dict(base, preview=c[0], view=c[1])) for c in configs}
    bare_req = validate_request(base)
    marks: dict = {}
    runs = {"bare": lambda: bare_run(caches["inline"], bare_req, source)}
    for c in configs:
        runs[c] = lambda c=c: app_run(caches[c[2]], reqs[c], source, Path(tempfile.mkdtemp()), marks)
    for fn in runs.values():  # warm-up
        fn()
    samples = {key: [] for key in runs}
    every_picture = {key: [] for key in configs}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for key, fn in runs.items():
            marks.clear()
            start = time.perf_counter()
            fn()
            samples[key].append(marks.get("final", time.perf_counter()) - start)
            if key != "bare":
                every_picture[key].append(time.perf_counter() - start)
    bare = statistics.median(samples["bare"])
    rows = [{"variant": "bare diffusers (no callback)", "seconds": bare, "ms_per_step": 1000 * bare / base["steps"],
             "ratio": 1.0}]
    for (preview, view, how) in configs:
        key = (preview, view, how)
        t, whole = statistics.median(samples[key]), statistics.median(every_picture[key])
        rows.append({"variant": f"app: {preview}, {view}, decode {how}", "seconds": t,
                     "ms_per_step": 1000 * t / base["steps"], "ratio": t / bare,
                     "every_picture_seconds": whole, "every_picture_ratio": whole / bare})
    return rows


def server_section(cache, source, base: dict, step_counts=(10, 50, 100, 150)) -> list[dict]:
    """Gradio's own work per yield, generation taken out: a real run's frames are
    replayed through the UI handler, and each yielded update is postprocessed the
    way Gradio's queue does it (handler time + `postprocess_data`). Replayed frames come
    faster than `ui.events.UPDATE_INTERVAL`, so the interval is 0 here: an update a step."""
    from gradio.state_holder import SessionState

    from ui import events
    from ui.events import Runner
    from ui.stream import RunStore

    recorded = list(generate(validate_request(dict(base, steps=max(step_counts))), cache, source=source))
    frames, final = recorded[:-1], recorded[-1]
    root = str(Path(gr.utils.get_upload_folder()) / "stepwise-bench")  # where the app keeps runs
    rows = []
    interval, events.UPDATE_INTERVAL = events.UPDATE_INTERVAL, 0.0
    try:
        for n in step_counts:
            def replay(_request, _token, n=n):
                for f in frames[:n]:
                    yield replace(f, total=n)
                yield final

            demo = build_app(AppSpec(generate=replay, model_label="bench", run_root=root))
            block_fn = next(fn for fn in demo.fns.values() if fn.api_name == "txt2img")
            handler = Runner(replay, RunStore(root), Limits(), "bench").handler("txt2img")
            updates = handler(SimpleNamespace(session_hash="bench"), **{k: v for k, v in base.items() if k != "mode"})
            state, loop, per_yield = SessionState(demo), asyncio.new_event_loop(), []
            while True:
                start = time.perf_counter()
                out = next(updates, None)
                if out is None:
                    break
                loop.run_until_complete(demo.postprocess_data(block_fn, list(out), state))
                per_yield.append(time.perf_counter() - start)
            loop.close()
            rows.append({"steps": n, "yields": len(per_yield),
                         "server_ms_per_yield_median": 1000 * statistics.median(per_yield),
                         "server_ms_per_step_mean": 1000 * sum(per_yield) / n})
    finally:
        events.UPDATE_INTERVAL = interval
    return rows


def cache_section(source: str, repeats: int) -> dict:
    cache = ModelCache(device="cpu")
    cache.pipeline("txt2img", source)
    before = cache.total_bytes()
    start = time.perf_counter()
    cache.pipeline("img2img", source)
    img2img_ms = 1000 * (time.perf_counter() - start)
    added = cache.total_bytes() - before
    other = str(save_tiny_checkpoint(Path(tempfile.mkdtemp()) / "other", seed=5))
    sizes = sorted(ModelCache(device="cpu").checkpoint(s).nbytes() for s in (source, other))
    small = ModelCache(device="cpu", budget_bytes=sizes[1] + sizes[0] // 2)  # room for one checkpoint at a time
    small.checkpoint(source)
    switches = []
    for i in range(repeats):
        target = other if i % 2 == 0 else source
        start = time.perf_counter()
        small.checkpoint(target)
        switches.append(time.perf_counter() - start)
    return {"img2img_after_txt2img_ms": img2img_ms, "img2img_added_param_bytes": added,
            "switch_checkpoint_ms_median": 1000 * statistics.median(switches), "loaded_after_switches": small.loaded()}


def card_settings(source: str, steps: int) -> dict:
    """A txt2img request's fields for `source` with its card's settings (size, guidance, sampler)."""
    settings = layout.read_card(source)
    side = settings.get("width", 64)
    return dict(mode="txt2img", prompt="a red circle on the left, blue background", seed=7, steps=steps,
                guidance_scale=settings.get("guidance_scale", 4.0), width=side, height=settings.get("height", side),
                scheduler=settings.get("scheduler", "Euler"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BUNDLED)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default="benchmarks/results.json")
    p.add_argument("--skip-gpu", action="store_true")
    args = p.parse_args(argv)

    source = str(bundled_folder()) if args.model == BUNDLED else args.model
    cache = ModelCache(device="cpu")
    base = card_settings(source, args.steps)
    previews = ["latent-rgb", "full-vae"] + (["tiny-vae"] if cache.checkpoint(source).tiny_vae else [])
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "model": source,
        "settings": base,
        "streaming": streaming_section(source, base, args.repeats, previews),
        "callback": callback_section(source, base, args.repeats, previews),
        "server": server_section(cache, source, base),
        "cache": cache_section(source, args.repeats),
    }
    if not args.skip_gpu:
        results["gpu"] = gpu_section()
    print_table(results)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.json}")
    return results


def print_table(r: dict) -> None:
    print(f"model {r['model']} · {r['settings']['width']}x{r['settings']['height']} · {r['settings']['steps']} steps · "
          f"{r['machine']['threads']} threads · torch {r['machine']['torch']}")
    print("\n1. streaming overhead (median): to the final image; to every picture of the run made")
    for row in r["streaming"]:
        whole = f"  {row['every_picture_seconds']*1000:8.1f} ms x{row['every_picture_ratio']:.3f}" \
            if "every_picture_seconds" in row else ""
        print(f"  {row['variant']:<40} {row['seconds']*1000:8.1f} ms  {row['ms_per_step']:7.2f} ms/step  "
              f"x{row['ratio']:.3f}{whole}")
    print("  the step callback's own time on the denoising thread, per step (decode thread)")
    for row in r["callback"]:
        print(f"  {row['preview']:<40} {row['callback_us_median']:8.1f} us median  {row['callback_us_p90']:8.1f} us p90"
              f"  over {row['calls']} steps")
    print("\n2. Gradio server work per yield (generation excluded)")
    for row in r["server"]:
        print(f"  {row['steps']:>4} steps: {row['server_ms_per_yield_median']:6.2f} ms/yield median, "
              f"{row['server_ms_per_step_mean']:6.2f} ms/step mean over {row['yields']} yields")
    c = r["cache"]
    print(f"\n3. cache: img2img after txt2img {c['img2img_after_txt2img_ms']:.1f} ms, "
          f"+{c['img2img_added_param_bytes']} parameter bytes; checkpoint switch {c['switch_checkpoint_ms_median']:.0f} ms")
    if "gpu" in r:
        print("\n4. GPU section")
        for row in r["gpu"].get("rows", []):
            callback = f"  callback {row['callback_us_median']:.0f} us/step" if "callback_us_median" in row else ""
            print(f"  {row['variant']:<40} {row['seconds']:8.3f} s  x{row.get('ratio', 1):.3f}{callback}")
        print(f"  ({r['gpu'].get('note', '')})")


if __name__ == "__main__":
    main()
