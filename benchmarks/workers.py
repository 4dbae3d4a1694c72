"""Scale-out on Ray Serve: throughput with 1 and 2 replicas, and what streaming through Serve costs a step.

    python -m benchmarks.workers [--replicas 1 2] [--runs 16] [--repeats 3] [--steps 20]
                                 [--preview latent-rgb] [--json benchmarks/results-workers.json]

Each configuration is the app in its own process (`python app.py --workers N`, or the single-process
app for the per-step figure), driven through gradio_client (`download_files=False`) with the page's
start values for the bundled model, `--steps` steps, and `--preview` (default: the page's).
- Throughput: `--runs` runs submitted at once, each from its own session (one session's new run
  supersedes its old one), as many users would; runs per minute from the first submit to the last
  final image, median of `--repeats` after a warm-up round. Each client receives the run's updates
  (at most ten step updates a second: `ui.events.UPDATE_INTERVAL`) and waits on its job's result,
  since iterating a gradio_client job polls every 1 ms, on the cores the app needs. On a 2-core
  machine two plain processes side by side finish about 1.7x the work of one
  (../shared/reference/FACTS.md): that is the ceiling.
- Per step: one run of 50 steps at a time; the client's time from the first step's update to the
  final image over the steps between, median of `--repeats`, for the single-process app and for one
  replica: their difference is what the Serve hop (message, PNG pictures, object store) adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from .e2e import FIELDS, PROMPT, App


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--preview", default=None, help="the runs' preview decoder (default: the page's)")
    p.add_argument("--json", default="benchmarks/results-workers.json")
    args = p.parse_args(argv)
    results = {"runs": args.runs, "repeats": args.repeats, "steps": args.steps, "throughput": {}, "per_step": {}}
    for replicas in args.replicas:
        with served(["--workers", str(replicas)]) as url:
            settings = page_settings(url, args)
            results["settings"] = settings
            results["throughput"][replicas] = throughput(url, settings, args.runs, args.repeats)
            if replicas == 1:
                results["per_step"]["serve, 1 replica"] = per_step(url, settings, args.repeats)
        print(f"{replicas} replica(s): {results['throughput'][replicas]['runs_per_minute']:.1f} runs/min", flush=True)
    with served([]) as url:
        results["per_step"]["one process"] = per_step(url, page_settings(url, args), args.repeats)
    print_table(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return results


def served(flags: list[str]):
    """The app with `flags` and --no-save in its own process (benchmarks.e2e.App), as a context manager
    giving its URL."""
    work = Path(tempfile.mkdtemp(prefix="stepwise-workers-"))
    return App(argparse.Namespace(no_save=True, model=None), work, work / "marks.jsonl", tuple(flags))


def page_settings(url: str, args) -> dict:
    from gradio_client import Client

    api = Client(url, verbose=False, download_files=False).view_api(print_info=False, return_format="dict")
    page = {p["parameter_name"]: p.get("parameter_default") for p in api["named_endpoints"]["/txt2img"]["parameters"]}
    settings = {name: page[name] for name in FIELDS if name in page} | {"prompt": PROMPT, "steps": args.steps}
    return settings | ({"preview": args.preview} if args.preview else {})


def throughput(url: str, settings: dict, runs: int, repeats: int) -> dict:
    """Runs per minute for `runs` runs submitted at once (seeds 0..runs-1), median of `repeats` after a
    warm-up round; every run must end with its final image."""
    from gradio_client import Client

    clients = [Client(url, verbose=False, download_files=False) for _ in range(runs)]
    rounds = []
    for n in range(repeats + 1):
        finals: list = [None] * runs

        def one(i: int) -> None:  # result() blocks on the job; iterating it would poll every 1 ms beside the app
            finals[i] = clients[i].submit(**{**settings, "seed": i}, api_name="/txt2img").result()[2]

        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(runs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        missing = [i for i, final in enumerate(finals) if final is None]
        if missing:
            raise RuntimeError(f"runs {missing} ended without a final image")
        if n:  # the first round warms up every replica
            rounds.append(seconds)
    wall = statistics.median(rounds)
    return {"seconds": wall, "runs_per_minute": 60 * runs / wall, "rounds": rounds}


def per_step(url: str, settings: dict, repeats: int, steps: int = 50) -> float:
    """Median seconds per step at the client, from the first step's update to the final image."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    times = []
    for n in range(repeats + 1):
        arrivals = [time.perf_counter() for _ in client.submit(**{**settings, "steps": steps, "seed": n},
                                                                  api_name="/txt2img")]
        if n:
            times.append((arrivals[-1] - arrivals[0]) / steps)  # steps 2..N and the final image, however paced
    return statistics.median(times)


def print_table(r: dict) -> None:
    s = r["settings"]
    print(f"\n{r['runs']} runs at once · {s['width']}x{s['height']} · {r['steps']} steps · {s['scheduler']} · "
          f"preview {s['preview']}, {s['view']} · median of {r['repeats']}")
    base = r["throughput"].get(1) or r["throughput"].get("1")
    for replicas, row in r["throughput"].items():
        ratio = f"  x{row['runs_per_minute'] / base['runs_per_minute']:.2f}" if base else ""
        print(f"  {replicas} replica(s): {row['runs_per_minute']:6.1f} runs/min ({row['seconds']:.1f} s){ratio}")
    one, serve = r["per_step"].get("one process"), r["per_step"].get("serve, 1 replica")
    if one and serve:
        print(f"  per step (50-step run, at the client): one process {1000 * one:.1f} ms, through Serve "
              f"{1000 * serve:.1f} ms: {1000 * (serve - one):+.1f} ms")


if __name__ == "__main__":
    sys.exit(main() and 0)
