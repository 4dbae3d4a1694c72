"""Per model family on the tiny random models: the bare diffusers call vs the app path, per step.

    python -m benchmarks.families [--side 64] [--steps 10] [--repeats 5] [--json benchmarks/results-families.json]

For each family of `pipelines.tiny` (SD, SDXL, SD 3, Flux) and each preview decoder it has
(latent-rgb, tiny-vae, full-vae): the bare pipeline call with no callback (the family's own
pipeline class and sampler, same seed and inputs as the app passes) and the app path (`generate`,
every step decoded and stored as the UI stores it: `run.app_run`), median of `--repeats`
interleaved runs after a warm-up. One intra-op thread on CPU by default, as the app runs on
2 cores (`pipelines.devices.app_cpu_threads`), `OMP_WAIT_POLICY=PASSIVE` as app.py sets it.
The tiny models' steps are a few ms of Python dispatch: these figures compare paths, not families.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it, before torch loads

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipelines import ModelCache, validate_request
from pipelines.devices import app_cpu_threads
from pipelines.families import family_named
from pipelines.tiny import FAMILIES, save_tiny_family

from .run import app_run, bare_run

PROMPT = "a red circle on the left, blue background"


def family_rows(family: str, side: int, steps: int, repeats: int) -> list[dict]:
    """One row per preview decoder of `family`'s tiny model: bare and app seconds per step (medians)."""
    source = str(save_tiny_family(Path(tempfile.mkdtemp()) / family, family))
    cache = ModelCache(device="cpu")
    checkpoint = cache.checkpoint(source)
    limits, defaults = checkpoint.limits(), checkpoint.family
    scheduler = defaults.default_scheduler if defaults.default_scheduler in limits.schedulers else limits.schedulers[0]
    base = dict(mode="txt2img", prompt=PROMPT, seed=7, steps=steps, guidance_scale=defaults.default_guidance,
                width=side, height=side, scheduler=scheduler, view="x0")
    reqs = {p: validate_request(dict(base, preview=p), limits) for p in limits.preview_modes}
    runs = {"bare": lambda: bare_run(cache, reqs["latent-rgb"], source)}
    for preview, req in reqs.items():
        runs[preview] = lambda req=req: app_run(cache, req, source, Path(tempfile.mkdtemp()))
    for fn in runs.values():  # warm-up
        fn()
    samples = {key: [] for key in runs}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    bare = statistics.median(samples["bare"])
    return [{"family": family, "label": defaults.label, "preview": preview, "scheduler": scheduler,
             "bare_ms_per_step": 1000 * bare / steps,
             "app_ms_per_step": 1000 * statistics.median(samples[preview]) / steps,
             "ratio": statistics.median(samples[preview]) / bare} for preview in reqs]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=64, help="image width and height, px")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the app's, cores - 1)")
    text_to_image = [f for f in FAMILIES if "txt2img" in family_named(f).modes]  # flux-depth runs only depth2img
    p.add_argument("--families", nargs="+", default=text_to_image, choices=text_to_image)
    p.add_argument("--json", default="benchmarks/results-families.json", help="where to write the results ('' = nowhere)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads or app_cpu_threads())
    rows = [row for family in args.families for row in family_rows(family, args.side, args.steps, args.repeats)]
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_1min": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "settings": {"side": args.side, "steps": args.steps, "repeats": args.repeats, "prompt": PROMPT, "seed": 7,
                     "view": "x0"},
        "rows": rows,
    }
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return results


def print_table(r: dict) -> None:
    s, m = r["settings"], r["machine"]
    print(f"tiny models · {s['side']}x{s['side']} · {s['steps']} steps · view {s['view']} · median of {s['repeats']} · "
          f"{m['threads']} thread(s) · load {m['load_average_1min']:.2f} on {m['cores']} cores · torch {m['torch']}")
    print(f"  {'family':<12} {'preview':<11} {'scheduler':<9} {'bare ms/step':>12} {'app ms/step':>12} {'app/bare':>9}")
    for row in r["rows"]:
        print(f"  {row['label']:<12} {row['preview']:<11} {row['scheduler']:<9} {row['bare_ms_per_step']:>12.2f} "
              f"{row['app_ms_per_step']:>12.2f} {row['ratio']:>9.3f}")


if __name__ == "__main__":
    main()
