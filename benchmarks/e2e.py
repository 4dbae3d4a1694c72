"""End to end: submit to final image through the served app, beside the bare diffusers call.

    python -m benchmarks.e2e [--model bundled] [--steps 20 50] [--repeats 5] [--threads 1 2 ...]
                             [--no-save] [--workers N] [--same-process] [--preview NAME]
                             [--json benchmarks/results-e2e.json]

The app runs in its own process as `python app.py` runs it (its CPU thread rule, Gradio's
queue, each step's JPEG and update, the final PNG, the run's folder in the outputs), with
marks added around the event handler. This process is a gradio_client (`download_files=False`)
that submits txt2img runs with the page's start values (the model's preset or defaults; seed
and steps set here) and notes when each update arrives. The bare diffusers call, same
settings, runs in a child process per intra-op thread count (OpenMP sizes its pool once per
process); the fastest count is the comparison, and one bare call at that count runs before
each app run (`Interleaved`): each a median of `--repeats` after a warm-up.

Submit to final image, broken down with the app's marks (one clock, one machine):
- queue: submit -> the event handler starts (HTTP, Gradio's queue, preprocessing)
- generation: handler start -> the final image reaches the handler (validation, the pipeline
  with its step callback and decode thread, and each step's JPEG and update where the
  handler falls behind the pipeline)
- encoding: the final image reaches the handler -> its update is yielded (final PNG, tensors)
- transport: that update yielded -> the client has it (Gradio's postprocess and event
  stream, and gradio_client, which looks for new messages every 50 ms when it has none)
and after it, final -> done: the run's folder written (every file synced), the event's end.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it, before torch loads

import argparse
import json
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, SEED = "a red circle on the left, blue background", 7
# the request fields the bare call takes too; the rest of the API's parameters keep the page's values
FIELDS = ("prompt", "negative_prompt", "seed", "guidance_scale", "width", "height", "scheduler", "preview", "view")
PARTS = ("queue", "generation", "encoding", "transport")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="--model for the app and the bare call (default: the app's)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="intra-op thread counts to try for the bare call (default: 1, 2, 4, ... up to the cores)")
    p.add_argument("--no-save", action="store_true", help="run the app with --no-save (no outputs folder)")
    p.add_argument("--workers", type=int, default=None, help="run the app with --workers N (Ray Serve replicas)")
    p.add_argument("--same-process", action="store_true",
                   help="run the app with --same-process (on a CPU, generation in the server's own process)")
    p.add_argument("--preview", default=None, help="the runs' preview decoder (default: the page's)")
    p.add_argument("--ssl-verify", action="store_true",
                   help="gradio_client's default: load the CA bundle at each of its requests (about 20 ms each)")
    p.add_argument("--json", default="benchmarks/results-e2e.json")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "MARKS"), help=argparse.SUPPRESS)  # the app's process
    p.add_argument("--bare", type=int, metavar="THREADS", help=argparse.SUPPRESS)  # a bare call's process
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--bare-on-request", action="store_true", help=argparse.SUPPRESS)  # `Interleaved`'s process
    args, app_flags = p.parse_known_args(argv)
    if args.serve:  # the app's own flags follow `--`
        return serve(int(args.serve[0]), Path(args.serve[1]), [f for f in app_flags if f != "--"])
    if app_flags:
        p.error(f"unrecognized arguments: {' '.join(app_flags)}")
    if args.bare:
        return bare(args.bare, json.loads(args.settings), args)

    cores = os.cpu_count() or 1
    threads = args.threads or sorted({*(2**k for k in range(cores.bit_length()) if 2**k <= cores), cores})
    work = Path(tempfile.mkdtemp(prefix="stepwise-e2e-"))
    marks = work / "marks.jsonl"
    flags = (("--workers", str(args.workers)) if args.workers else ()) + \
        (("--same-process",) if args.same_process else ())
    with App(args, work, marks, flags) as url:
        from gradio_client import Client

        # plain http on localhost: certificate checks do nothing here, but with them on httpx loads the CA bundle
        # at each of gradio_client's requests (about 20 ms, before the submit reaches the app); a browser
        # does not pay that, so by default neither does this client
        client = Client(url, verbose=False, download_files=False, ssl_verify=args.ssl_verify)
        page = {p["parameter_name"]: p.get("parameter_default")
                for p in client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/txt2img"]
                ["parameters"]}
        settings = {name: page[name] for name in FIELDS if name in page} | {"prompt": PROMPT, "seed": SEED}
        settings |= {"preview": args.preview} if args.preview else {}
        bare_rows = [bare_child(n, settings, args) for n in threads]
        fastest = min(bare_rows, key=lambda b: b["seconds"][str(args.steps[0])])["threads"]
        interleaved = Interleaved(fastest, settings, args)
        try:
            app_rows = [app_runs(client, settings, steps, args.repeats, marks, interleaved) for steps in args.steps]
        finally:
            interleaved.close()
        for row in app_rows:
            row["bare_threads"] = fastest
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                    "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "settings": settings, "repeats": args.repeats, "save": not args.no_save, "workers": args.workers,
        "same_process": args.same_process, "ssl_verify": args.ssl_verify,
        "bare": bare_rows, "app": app_rows,
    }
    print_table(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return results


class App:
    """The app in its own process (`--serve`, with the app's `flags`), served on a free localhost port; its
    handler's marks go to `marks`, one JSON line per run. A context manager giving the URL; the process is
    stopped after (Ctrl-C, so a local Ray it started shuts down with it)."""

    def __init__(self, args, work: Path, marks: Path, flags: tuple[str, ...] = ()):
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            self.port = free.getsockname()[1]
        flags = [*flags, *(["--no-save"] if args.no_save else ["--outputs", str(work / "outputs")])]
        flags += ["--model", args.model] if args.model else []
        self.command = [sys.executable, "-m", "benchmarks.e2e", "--serve", str(self.port), str(marks), "--", *flags]
        self.env = dict(os.environ, GRADIO_TEMP_DIR=str(work / "gradio"), PYTHONUNBUFFERED="1")
        self.log = work / "app.txt"

    def __enter__(self) -> str:
        import httpx

        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the app did not serve within 300 s: {self.log.read_text()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        interrupt(self.proc)


def interrupt(proc: subprocess.Popen) -> None:
    """Stop an app's process as Ctrl-C does, so a local Ray it started shuts down with it; killed after 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(port: int, marks: Path, flags: list[str]) -> dict:
    """`python app.py --port PORT *flags`, with marks around the event handler (`PARTS`)."""
    import app as app_module  # first: it sets the environment torch reads as it loads
    from pipelines import Final
    from ui.events import Runner, RunUpdate

    current: dict = {}
    init, run = Runner.__init__, Runner._run
    final_at = RunUpdate._fields.index("final")

    def marked_init(self, generate, *a, **kw):  # the app's run function, in one process or on workers
        def marked_generate(*args, **kwargs):
            for item in generate(*args, **kwargs):
                if isinstance(item, Final):
                    current["final_in"] = time.time()
                yield item

        init(self, marked_generate, *a, **kw)

    def marked_run(self, *a, **kw):
        current.clear()
        current["handler_start"] = time.time()
        try:
            for update in run(self, *a, **kw):
                if update[final_at] is not None and "final_out" not in current:
                    current["final_out"] = time.time()
                yield update
        finally:
            current["handler_end"] = time.time()
            with open(marks, "a") as f:
                f.write(json.dumps(current) + "\n")

    Runner.__init__, Runner._run = marked_init, marked_run
    app_module.main(["--port", str(port), *flags])
    return {}


def bare_command(threads: int, settings: dict, args, *more: str) -> tuple[list[str], dict]:
    """The command and environment of a bare call's process at `threads` intra-op threads (OpenMP sizes
    its pool once per process)."""
    command = [sys.executable, "-m", "benchmarks.e2e", "--bare", str(threads), "--settings", json.dumps(settings),
               *more, *(["--model", args.model] if args.model else [])]
    return command, dict(os.environ, OMP_NUM_THREADS=str(threads))


def bare_child(threads: int, settings: dict, args) -> dict:
    """The bare call's times at `threads` intra-op threads, in a process of its own."""
    command, env = bare_command(threads, settings, args, "--repeats", str(args.repeats),
                                "--steps", *map(str, args.steps))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the bare call at {threads} threads failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bare(threads: int, settings: dict, args) -> dict:
    """Print the bare call's median seconds per step count, as one JSON line."""
    import torch

    from pipelines import ModelCache, validate_request
    from pipelines.cache import BUNDLED, bundled_folder

    from .run import bare_run

    torch.set_num_threads(threads)
    source = args.model or str(bundled_folder())
    source = str(bundled_folder()) if source == BUNDLED else source
    cache = ModelCache(device="cpu")
    if args.bare_on_request:  # one bare call per step count read from stdin, its seconds printed back
        for line in sys.stdin:
            req = validate_request(dict(settings, mode="txt2img", steps=int(line)))
            start = time.perf_counter()
            bare_run(cache, req, source)
            print(time.perf_counter() - start, flush=True)
        return {}
    seconds = {}
    for steps in args.steps:
        req = validate_request(dict(settings, mode="txt2img", steps=steps))
        bare_run(cache, req, source)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            bare_run(cache, req, source)
            times.append(time.perf_counter() - start)
        seconds[str(steps)] = statistics.median(times)
    result = {"threads": threads, "seconds": seconds}
    print(json.dumps(result))
    return result


class Interleaved:
    """The bare call at `threads` intra-op threads in a process of its own, one call when asked (`seconds`),
    so that bare and app runs alternate: this VM's speed drifts by a third within minutes, so a bare
    median taken before the app's runs was no fair comparison for them."""

    def __init__(self, threads: int, settings: dict, args):
        command, env = bare_command(threads, settings, args, "--bare-on-request")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def seconds(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the bare call's process stopped")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def app_runs(client, settings: dict, steps: int, repeats: int, marks: Path, bare: Interleaved) -> dict:
    """Median submit-to-final-image and its parts over `repeats` runs of `steps` steps, after a warm-up,
    each run after one bare call (`bare`); `bare_seconds` is their median and `ratio` the median of each
    run's ratio to the bare call before it."""
    from ui.events import API_OUTPUTS

    runs = []
    for n in range(repeats + 1):
        bare_seconds = bare.seconds(steps)
        start = time.time()
        first = final = None
        job = client.submit(**settings, steps=steps, api_name="/txt2img")
        seen = 0
        while True:  # job.outputs(), not the job's iterator, which sleeps 1 ms at a time holding the lock that
            # gradio_client's receiving thread needs to add each update: that delayed the updates it timed
            finished, outputs = job.done(), job.outputs()
            for update in outputs[seen:]:
                first = first or time.time()
                if final is None and update[API_OUTPUTS["final"]] is not None:
                    final = time.time()
            seen = len(outputs)
            if finished:
                break
            time.sleep(0.001)
        done = time.time()
        server = json.loads(marks.read_text().splitlines()[-1])
        if n == 0:
            continue  # warm-up
        runs.append({"submit_to_final": final - start, "submit_to_first_step": first - start,
                     "final_to_done": done - final,
                     "queue": server["handler_start"] - start,
                     "generation": server["final_in"] - server["handler_start"],
                     "encoding": server["final_out"] - server["final_in"],
                     "transport": final - server["final_out"], "bare_seconds": bare_seconds,
                     "ratio": (final - start) / bare_seconds})
    return {"steps": steps, **{key: statistics.median(r[key] for r in runs) for key in runs[0]}, "runs": runs}


def print_table(r: dict) -> None:
    s = r["settings"]
    print(f"{s['width']}x{s['height']} · {s['scheduler']} · CFG {s['guidance_scale']} · preview {s['preview']}, "
          f"{s['view']} · {r['machine']['cores']} cores · median of {r['repeats']}"
          + ("" if r["save"] else " · --no-save"))
    print("\nbare diffusers call, by intra-op threads")
    for row in r["bare"]:
        print(f"  {row['threads']:>3} threads  " + "  ".join(f"{k} steps {v:7.3f} s" for k, v in row["seconds"].items()))
    print("\napp through gradio_client (download_files=False): submit to final image")
    print(f"  {'steps':>5} {'bare':>8} {'app':>8} {'x bare':>7}  " + "".join(f"{p:>11}" for p in PARTS)
          + f"  {'final->done':>11}")
    for row in r["app"]:
        print(f"  {row['steps']:>5} {row['bare_seconds']:8.3f} {row['submit_to_final']:8.3f} {row['ratio']:7.2f}  "
              + "".join(f"{row[p]:11.3f}" for p in PARTS) + f"  {row['final_to_done']:11.3f}")
    print("  (seconds, medians; bare: one call at its fastest thread count before each app run, x bare the median of\n"
          "   each run's ratio to it; the parts add up to app)")


if __name__ == "__main__":
    main()
