"""The app end to end: a real server on localhost, driven through gradio_client."""

import gc
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image

import app as app_module
from pipelines import ModelCache, layout, validate_request
from ui.events import API_OUTPUTS as OUT  # a run's API results by name

from .conftest import free_port, pixels
from .test_generate import bare_call, bare_pipeline

STEPS = 6


@pytest.fixture(scope="module")
def server_cache():
    return ModelCache(device="cpu")


@pytest.fixture(scope="module")
def server(tiny_dir, server_cache):
    args = app_module.parse_args(["--model", str(tiny_dir)])
    demo = app_module.create_demo(args, server_cache)
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    yield demo
    demo.close()


@pytest.fixture
def client(server):
    return Client(server.local_url, verbose=False)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (30, 40, 200)
    pixels[16:48, 16:48] = (220, 30, 30)
    Image.fromarray(pixels).save(path)
    return str(path)


COMMON = dict(prompt="a red square", negative_prompt="", seed=21, steps=STEPS, guidance_scale=5.0, width=64,
              height=64, scheduler="Euler", preview="latent-rgb")


def stream(client, api_name, **kwargs):
    return list(client.submit(**{**COMMON, **kwargs}, api_name=api_name))


@pytest.mark.parametrize("api_name,extra,steps", [
    ("/txt2img", {}, STEPS),
    ("/img2img", {"strength": 0.5}, STEPS // 2),
    ("/depth2img", {"strength": 1.0}, STEPS),
])
def test_each_endpoint_streams_its_steps_and_a_final_image(client, scene_file, api_name, extra, steps):
    if api_name != "/txt2img":
        extra = dict(extra, image=handle_file(scene_file))
    updates = stream(client, api_name, **extra)
    shown = [int(u[OUT["preview"]][-8:-4]) for u in updates if u[OUT["final"]] is None]  # step_0001.jpg: 1
    # steps faster than UPDATE_INTERVAL share an update, and on a CPU a step no update showed is drawn after
    # the final image: each update shows the newest step; the last update's gallery every step
    assert shown[0] == 1 and shown == sorted(shown) and len(shown) <= steps
    final = updates[-1]
    gallery = final[OUT["gallery"]]
    assert [item["caption"].split(" · ")[0] for item in gallery] == [f"step {i}/{steps}" for i in range(1, steps + 1)]
    assert Image.open(final[OUT["final"]]).size == (64, 64)
    assert f"seed `{COMMON['seed']}`" in final[OUT["info"]]


def test_same_seed_twice_gives_identical_pixels_equal_to_bare_diffusers(client, tiny_dir):
    a = Image.open(stream(client, "/txt2img")[-1][OUT["final"]])
    b = Image.open(stream(client, "/txt2img")[-1][OUT["final"]])
    assert np.array_equal(pixels(a), pixels(b))
    from pipelines import validate_request

    expected = bare_call(validate_request({"mode": "txt2img", **COMMON}), bare_pipeline("txt2img", tiny_dir, "Euler"))
    assert np.array_equal(pixels(a), pixels(expected))


def test_final_png_carries_a1111_parameters(client):
    final = Image.open(stream(client, "/txt2img")[-1][OUT["final"]])
    params = final.info["parameters"]
    assert params.startswith("a red square\n") and "Steps: 6, Sampler: Euler, CFG scale: 5.0, Seed: 21" in params


def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(client):
    with pytest.raises(Exception, match="width: must be a multiple of 8"):
        client.predict(**{**COMMON, "width": 100}, api_name="/txt2img")
    with pytest.raises(Exception, match="image: is required"):
        client.predict(**COMMON, image=None, api_name="/img2img")
    assert len(stream(client, "/txt2img")[-1][OUT["gallery"]]) == STEPS


def test_stop_ends_only_the_callers_run(server):
    mine, theirs = Client(server.local_url, verbose=False), Client(server.local_url, verbose=False)
    job = mine.submit(**{**COMMON, "steps": 150}, api_name="/txt2img")
    for update in job:
        if update[0]:  # first frame arrived: stop from the same session
            theirs.predict(api_name="/stop")  # another session's Stop touches nothing
            mine.predict(api_name="/stop")
            break
    updates = list(job) if not job.done() else job.outputs()
    assert "Stopped at step" in updates[-1][OUT["info"]]
    assert len(stream(theirs, "/txt2img")[-1][OUT["gallery"]]) == STEPS


def test_launch_defaults_are_safe(server):
    args = app_module.parse_args([])
    assert args.host == "127.0.0.1" and not args.share and args.auth is None
    assert server._queue.max_size == app_module.MAX_QUEUE
    gpu_events = [fn for fn in server.fns.values() if fn.api_name in ("txt2img", "img2img", "depth2img")]
    assert len(gpu_events) == 3
    assert {fn.concurrency_id for fn in gpu_events} == {"gpu"} and {fn.concurrency_limit for fn in gpu_events} == {1}
    assert server.max_file_size == 20 * 1024 * 1024
    assert server.state_session_capacity == app_module.MAX_SESSIONS


def wait_for(condition, what: str, limit: float = 120):
    """Poll until `condition()`; fail naming `what` after `limit` seconds (a guard, not a timing)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def hold_at_first_step(cache, source, monkeypatch) -> threading.Event:
    """Make runs wait at their first denoiser call until the returned event is set.

    A test that queues a run behind another needs the first still running when it looks:
    a fast machine finishes a short run before the queue is ever seen (CI once failed so).
    """
    unet = cache.pipeline("txt2img", source).unet
    gate, forward = threading.Event(), unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: (gate.wait(120), forward(*a, **k))[1])
    return gate


def test_the_run_folders_are_gradios_first_static_path(server):
    """Gradio checks each file of an update against its static paths in order, resolving both each time;
    the run folders come first (`ui.layout._serve_as_is`), and their files go out as they are, not copied."""
    from gradio.data_classes import _StaticFiles
    from gradio.utils import is_static_file

    root = server.run_store.root.resolve()
    assert _StaticFiles.all_paths[0] == root
    *_, last = stream(Client(server.local_url, verbose=False, download_files=False), "/txt2img", steps=2)
    files = [item["image"]["path"] for item in last[OUT["gallery"]]] + [last[OUT["final"]]["path"]]
    assert len(files) == 3 and all(root in Path(f).resolve().parents and is_static_file(f) for f in files)


def test_stop_withdraws_the_callers_queued_run(server, server_cache, tiny_dir, monkeypatch):
    mine, theirs = Client(server.local_url, verbose=False), Client(server.local_url, verbose=False)
    assert len(stream(mine, "/txt2img")[-1][OUT["gallery"]]) == STEPS  # the session has a finished run before
    reference = bare_call(validate_request({"mode": "txt2img", **COMMON, "seed": 77, "steps": 40}),
                          bare_pipeline("txt2img", tiny_dir, "Euler"))
    gate = hold_at_first_step(server_cache, str(tiny_dir), monkeypatch)
    running = theirs.submit(**{**COMMON, "seed": 77, "steps": 40}, api_name="/txt2img")
    wait_for(lambda: server_cache.run_lock.locked(), "the other client's run to start")
    queued = mine.submit(**COMMON, api_name="/txt2img")  # waits behind it: one run at a time
    wait_for(lambda: queued.status().code == Status.IN_QUEUE, "my run to be queued")
    mine.predict(api_name="/stop")
    gate.set()
    with pytest.raises(Exception, match="Stopped before it started: Stop took this run out of the queue"):
        queued.result()
    assert queued.outputs() == []  # not one frame, no final image
    final = running.result()
    assert np.array_equal(pixels(Image.open(final[OUT["final"]])), pixels(reference))
    assert not running.outputs()[-1][OUT["info"]].startswith("Stopped")
    assert len(stream(mine, "/txt2img")[-1][OUT["gallery"]]) == STEPS  # Stop left nothing behind: the next run runs


def test_stop_ends_the_callers_running_run_and_withdraws_its_queued_one(server, server_cache, tiny_dir,
                                                                      monkeypatch):
    client = Client(server.local_url, verbose=False)
    gate = hold_at_first_step(server_cache, str(tiny_dir), monkeypatch)
    running = client.submit(**{**COMMON, "steps": 150}, api_name="/txt2img")
    wait_for(lambda: server_cache.run_lock.locked(), "the first run to start")
    queued = client.submit(**COMMON, api_name="/txt2img")
    wait_for(lambda: queued.status().code == Status.IN_QUEUE, "the second run to be queued")
    client.predict(api_name="/stop")
    gate.set()
    with pytest.raises(Exception, match="Stopped before it started"):
        queued.result()
    running.result()
    last = running.outputs()[-1]
    assert last[OUT["info"]].startswith("Stopped at step") and last[OUT["final"]] is None  # no final image
    assert len(last[OUT["gallery"]]) == int(last[OUT["info"]].split("step ")[1].split("/")[0])  # the steps so far stay


def test_hundred_api_runs_leave_the_servers_memory_flat(server):
    store, process = server.run_store, psutil.Process()
    client = Client(server.local_url, verbose=False, download_files=False)
    # short runs keep the test in CI time: the store's own accounting is exact, so flat counts and
    # bytes prove the bound whatever a run holds (here about 0.1 MB; a 150-step bundled run 1.3 MB)
    settings = {**COMMON, "steps": 2, "width": 64, "height": 64, "preview": "latent-rgb"}

    def api_runs(seeds):  # each from a new session that never comes back, as /gradio_api/call/ clients do
        for seed in seeds:
            client.reset_session()
            assert client.predict(**{**settings, "seed": seed}, api_name="/txt2img")[2]
        gc.collect()
        return store.usage(), process.memory_info().rss

    before, rss_before = api_runs(range(40))  # past the store's bounds
    after, rss_after = api_runs(range(40, 100))
    assert before["memory_runs"] == after["memory_runs"] == app_module.RUN_MEMORY[0]
    assert before["memory_bytes"] == after["memory_bytes"] > 0
    assert after["disk_runs"] <= app_module.KEEP_RUNS
    assert len(server.state_holder.session_data) <= app_module.MAX_SESSIONS
    # Gradio's sets of files it served hold only the runs still on disk: 6 previews, 6 gallery items, 1 final
    served = [path for files in server.temp_file_sets for path in files if path.startswith(str(store.root))]
    assert len(served) <= app_module.KEEP_RUNS * 13
    # RSS is noisy (allocator arenas), so the bound is loose; 60 runs kept would add 79 MB
    assert rss_after - rss_before < 40 * 2**20, f"RSS grew {(rss_after - rss_before) / 2**20:.0f} MB in 60 runs"


def test_controls_fit_each_familys_limits(tiny_families, server_cache):
    """What a model switch sets (and the page starts with): Flux hides the negative prompt, labels its
    guidance distilled and explains the depth tab; sizes step by the model's multiple."""
    from ui.layout import _fitted

    flux = app_module.model_view(server_cache, str(tiny_families("flux")), "flux")
    fit = _fitted(flux)
    assert flux.limits.distilled_guidance and not flux.limits.negative_prompt
    assert fit["negative_prompt"] == {"visible": False}
    assert fit["guidance_scale"]["label"].startswith("Distilled guidance") and fit["guidance_scale"]["value"] == 3.5
    assert fit["width"]["step"] == fit["height"]["step"] == flux.limits.size_multiple
    assert fit["mode:depth2img"] == {"visible": False} and fit["send:depth2img"] == {"visible": False}
    assert fit["note:depth2img"]["value"].startswith(f"**{flux.label}** (Flux.1) runs txt2img, img2img, not depth2img")
    assert fit["scheduler"]["choices"] == list(flux.limits.schedulers) and fit["steps"]["value"] == 28
    sd = _fitted(app_module.model_view(server_cache, str(tiny_families("sd")), "sd"))
    assert sd["negative_prompt"] == {"visible": True} and sd["guidance_scale"]["label"] == "Guidance scale (CFG)"
    assert sd["mode:depth2img"] == {"visible": True} and sd["note:depth2img"]["visible"] is False


@pytest.fixture(scope="module")
def models_server(tiny_families, tmp_path_factory, server_cache):
    """--models-dir with the tiny SD, the tiny Flux and a Flux folder without weights (listed, fails to load)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "1-sd").symlink_to(tiny_families("sd"))
    (folder / "2-flux").symlink_to(tiny_families("flux"))
    empty = folder / "3-empty"
    empty.mkdir()
    (empty / layout.MODEL_INDEX).write_text((tiny_families("flux") / layout.MODEL_INDEX).read_text())
    demo = app_module.create_demo(app_module.parse_args(["--models-dir", str(folder)]), server_cache)
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    yield demo, folder
    demo.close()


def test_a_picked_model_runs_for_its_session_only_and_a_failed_load_keeps_the_last(models_server):
    from .test_messages import fire

    demo, folder = models_server
    url, session = demo.local_url, "picker-session"
    flux = str(folder / "2-flux")
    picked = fire(url, "model-picker", "input", [flux], session)
    assert picked["error"] is None
    failed = fire(url, "model-picker", "input", [str(folder / "3-empty")], session)
    assert failed["error"].startswith("Could not load model '3-empty (Flux.1)': ")
    assert failed["error"].endswith("This page stays on '2-flux (Flux.1)'.")
    data = [None, None, *COMMON.values(), "x_t"]  # runs and model (gr.State: the server fills them), then the fields
    run = fire(url, "generate-txt2img", "click", data, session)  # the session's model: Flux
    info = run["outputs"][4]  # the page's outputs: RunUpdate's, runs included
    assert run["error"] is None and "distilled guidance 5.0" in info and "CFG" not in info
    other = fire(url, "generate-txt2img", "click", data)  # a new session: the start model, SD
    assert "CFG 5.0" in other["outputs"][4]
