"""Intra-op threads on CPU: bare diffusers call vs the app path (latent-rgb previews).

    python -m benchmarks.threads 1
    python -m benchmarks.threads 2

One thread count per process (OpenMP sizes its pool once). Bundled micro model, 64x64,
20 steps, DDIM, guidance 4; median of 7 interleaved runs each. OMP_WAIT_POLICY=PASSIVE,
as app.py sets it.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it, before torch loads

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines import ModelCache, validate_request
from pipelines.cache import bundled_folder

from .run import app_run, bare_run


def main(threads: int, repeats: int = 7) -> None:
    torch.set_num_threads(threads)
    source, cache = str(bundled_folder()), ModelCache(device="cpu")
    req = validate_request(dict(mode="txt2img", prompt="a red circle on the left, blue background", seed=7,
                                steps=20, guidance_scale=4.0, width=64, height=64, scheduler="DDIM",
                                preview="latent-rgb", view="x_t"))
    runs = {"bare": lambda: bare_run(cache, req, source),
            "app": lambda: app_run(cache, req, source, Path(tempfile.mkdtemp()))}
    samples = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    bare, app = (statistics.median(samples[k]) for k in ("bare", "app"))
    print(f"threads {threads}: bare {bare:.3f} s, app path {app:.3f} s (x{app / bare:.2f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
