"""Generation on Ray Serve (`python app.py --workers 2`): the app in its own process with a local Ray of
two CPU replicas of the bundled model (one intra-op thread each), driven through gradio_client, against
what the app makes in one process (`pipelines.generate` at the app's thread count).

CI installs ray (requirements-dev.txt) and sets STEPWISE_REQUIRE_RAY=1, so a missing ray fails there
instead of skipping. Starting Ray and its replicas takes about 35 s on a 2-core machine.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from gradio_client import Client
from PIL import Image

from benchmarks.e2e import interrupt
from pipelines import BUNDLED, ModelCache, generate, validate_request
from pipelines.devices import app_cpu_threads
from ui.events import API_OUTPUTS as OUT

from .conftest import free_port, pixels

if os.environ.get("STEPWISE_REQUIRE_RAY"):
    import ray  # noqa: F401 - CI must have it
else:
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[serve]==2.60.0')")

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(prompt="a red circle on the left, blue background", negative_prompt="", steps=6, guidance_scale=4.0,
           width=64, height=64, scheduler="DDIM", preview="latent-rgb", view="x0")
REPLICA = "ServeReplica:stepwise-"  # the replicas' process title: ServeReplica:<app>:Generator


class Served:
    """`python app.py FLAGS` on a free port, with Gradio's files in `tmp`; stopped with Ctrl-C (so a local
    Ray instance shuts down with it)."""

    def __init__(self, flags: list[str], tmp: Path, ready_in: float = 300):
        self.port = free_port()
        env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp / "gradio"), PYTHONUNBUFFERED="1")
        self.log = tmp / "app.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--no-save", *flags],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + ready_in
        while not self._up():
            assert self.proc.poll() is None, f"the app exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the app did not serve in {ready_in} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def _up(self) -> bool:
        try:
            return httpx.get(self.url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> Client:
        return Client(self.url, verbose=False)

    def stop(self) -> None:
        interrupt(self.proc)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    served = Served(["--workers", "2"], tmp_path_factory.mktemp("workers"))
    yield served
    served.stop()


def replicas() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if REPLICA in " ".join(p.info["cmdline"] or ())]


def final_pixels(updates: list) -> np.ndarray:
    return pixels(Image.open(updates[-1][OUT["final"]]))


def single_process_pixels(seeds: list[int]) -> dict[int, np.ndarray]:
    """The final images the app in one process makes (`pipelines.generate` at its one intra-op thread)."""
    cache, threads = ModelCache(device="cpu"), torch.get_num_threads()
    torch.set_num_threads(app_cpu_threads(2))
    try:
        return {seed: pixels(list(generate(validate_request({"mode": "txt2img", **RUN, "seed": seed}), cache,
                                           source=BUNDLED))[-1].image) for seed in seeds}
    finally:
        torch.set_num_threads(threads)


def test_sixteen_concurrent_users_get_the_single_process_pixels_and_every_step(workers):
    seeds = list(range(3, 19))  # as many as the queue holds: the page's limit is 16 waiting runs
    expected = single_process_pixels(seeds)
    results: dict[int, list] = {}
    errors: dict[int, BaseException] = {}

    def user(seed: int) -> None:
        job = workers.client().submit(**RUN, seed=seed, api_name="/txt2img")
        try:  # result(), not iterating: a job's iterator polls every 1 ms, on the cores the replicas need
            job.result()
        except Exception as err:  # noqa: BLE001 - reported below with the app's log
            errors[seed] = err
        results[seed] = job.outputs()

    users = [threading.Thread(target=user, args=(seed,)) for seed in seeds]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(timeout=300)
    assert sorted(results) == seeds
    assert not errors, f"{errors}\n{workers.log.read_text()[-3000:]}"
    for seed, updates in results.items():
        assert [u[OUT["final"]] is None for u in updates] == [True] * (len(updates) - 1) + [False]
        assert len(updates[-1][OUT["gallery"]]) == RUN["steps"]  # every step, then the final image
        assert np.array_equal(final_pixels(updates), expected[seed]), f"seed {seed}: pixels differ from one process"
    assert len(replicas()) == 2


def test_stop_ends_only_the_callers_run(workers):
    mine, theirs = workers.client(), workers.client()
    long = dict(RUN, steps=150, seed=8)
    their_job = theirs.submit(**dict(RUN, seed=9, steps=40), api_name="/txt2img")
    my_job = mine.submit(**long, api_name="/txt2img")
    for update in my_job:
        if update[OUT["preview"]]:  # my run is streaming on a replica: stop it
            mine.predict(api_name="/stop")
            break
    my_job.result()
    last = my_job.outputs()[-1]
    assert last[OUT["info"]].startswith("Stopped at step") and last[OUT["final"]] is None
    assert int(last[OUT["info"]].split("step ")[1].split("/")[0]) < long["steps"]
    their_job.result()
    assert their_job.outputs()[-1][OUT["final"]] is not None  # theirs ran to its end
    assert len(their_job.outputs()[-1][OUT["gallery"]]) == 40


def test_a_killed_replica_costs_one_run_not_the_server(workers):
    client = workers.client()
    job = client.submit(**dict(RUN, steps=150, seed=10), api_name="/txt2img")
    for update in job:
        if update[OUT["preview"]]:
            break
    busy = max(replicas(), key=lambda p: p.cpu_percent(interval=0.3))  # the replica running it
    busy.send_signal(signal.SIGKILL)
    with pytest.raises(Exception, match="the worker running this run stopped at step"):
        job.result(timeout=120)
    shown = [u for u in job.outputs() if u[OUT["preview"]]]
    assert shown, "the frames shown before the replica died are gone"
    # the next run goes to the live replica while Serve restarts the lost one
    updates = list(client.submit(**RUN, seed=11, api_name="/txt2img"))
    assert len(updates[-1][OUT["gallery"]]) == RUN["steps"] and updates[-1][OUT["final"]] is not None
    deadline = time.monotonic() + 120
    while len(replicas()) < 2:  # Serve puts the lost one back (about 14 s here)
        assert time.monotonic() < deadline, "Serve did not restart the killed replica in 120 s"
        time.sleep(1)
