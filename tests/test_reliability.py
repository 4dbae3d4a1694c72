"""Bad input, load, faults, security and disk, against a real server on localhost."""

import concurrent.futures as futures
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image

import app as app_module
from pipelines import GenerationError, Limits, ModelCache, generate, validate_request
from ui import events
from ui.events import API_OUTPUTS as OUT  # a run's API results by name
from ui.events import Runner
from ui.stream import RunStore

from .conftest import CASES, app_exit, pixels  # CASES: ../shared/cases, the issue-16 inputs
from .test_app import COMMON, free_port, hold_at_first_step, wait_for

STEPS = 4
BASE = dict(COMMON, steps=STEPS)


@pytest.fixture(scope="module")
def served(tiny_dir):
    cache = ModelCache(device="cpu")
    demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir)]), cache)
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    yield SimpleNamespace(demo=demo, cache=cache, url=demo.local_url, source=str(tiny_dir))
    demo.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Every awkward kind of upload, as files."""
    d = tmp_path_factory.mktemp("uploads")
    rgb = Image.new("RGB", (48, 40), (200, 30, 30))
    files = {}
    for name, image in {
        "gray.png": rgb.convert("L"), "rgba.png": rgb.convert("RGBA"), "palette.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"), "one_pixel.png": Image.new("RGB", (1, 1), (9, 9, 9)),
        "sixteen_bit.png": Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)),
    }.items():
        image.save(d / name)
        files[name] = str(d / name)
    Image.new("1", (9000, 9000)).save(d / "bomb.png")  # 81 megapixels in a few kB
    files["bomb.png"] = str(d / "bomb.png")
    good = d / "truncated.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(good)
    (d / "cut.png").write_bytes(good.read_bytes()[:300])
    files["truncated.png"] = str(d / "cut.png")
    (d / "text.png").write_text("this is not an image")
    files["not_an_image.png"] = str(d / "text.png")
    return files


# field, value, the whole error (it names the field and says what is allowed); the served model is the
# 32 px tiny one, whose sides run 16..128
BAD_FIELDS = [
    ("steps", 0, "Steps: Value 0 is less than minimum value 1."),
    ("steps", 151, "Steps: Value 151 is greater than maximum value 150."),
    ("steps", 2.5, "steps: must be a whole number, got 2.5"),
    ("seed", 1.5, "seed: must be a whole number, got 1.5"),  # gr.Number(precision=0) used to run it as seed 2
    ("width", 64.5, "width: must be a whole number, got 64.5"),
    ("height", 72.5, "height: must be a whole number, got 72.5"),
    ("guidance_scale", -1, "Guidance scale (CFG): Value -1 is less than minimum value 0.0."),
    ("guidance_scale", 31, "Guidance scale (CFG): Value 31 is greater than maximum value 30.0."),
    ("width", 8, "Width: Value 8 is less than minimum value 16."),
    ("width", 100, "width: must be a multiple of 8 (the model works on 8-pixel blocks), got 100"),
    ("height", 256, "Height: Value 256 is greater than maximum value 128."),
    ("seed", -5, "Seed (-1 = random): Value -5 is less than minimum value -1."),
    ("seed", 2**33, "Seed (-1 = random): Value 8589934592 is greater than maximum value 4294967295."),
    ("scheduler", "Heun++", "Scheduler: Value: Heun++ is not in the list of choices: ['DDIM', 'Euler', 'Euler a', "
                            "'DPM++ 2M', 'DPM++ 2M Karras', 'UniPC', 'PNDM']"),
    ("preview", "magic", "Preview decoder: Value: 'magic' (type: <class 'str'>) is not in the list of choices: "
                         "['latent-rgb', 'tiny-vae', 'full-vae']"),
    ("steps", "many", "Steps: 'many' is not a valid value"),
]


@pytest.mark.parametrize("field,value,message", BAD_FIELDS)
def test_bad_field_is_a_clear_error(served, field, value, message):
    with pytest.raises(Exception) as err:
        Client(served.url, verbose=False).predict(**{**BASE, field: value}, api_name="/txt2img")
    assert str(err.value) == message


def raw_call(url: str, api_name: str, values: dict) -> str:
    """Gradio's REST route with a hand-written JSON body: NaN and Infinity, which
    gradio_client refuses to send, reach the server this way."""
    params = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    order = [p["parameter_name"] for p in params[f"/{api_name}"]["parameters"]]
    body = "[" + ", ".join(values[name] if isinstance(values[name], str) and values[name] in ("NaN", "Infinity")
                           else json.dumps(values[name]) for name in order) + "]"
    event = httpx.post(f"{url}gradio_api/call/{api_name}", content='{"data": ' + body + "}",
                       headers={"content-type": "application/json"}).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api_name}/{event}", timeout=60).text


@pytest.mark.parametrize("value,message", [
    ("NaN", "guidance_scale: must be a finite number, got nan"),  # NaN passes the slider's range check
    ("Infinity", "Guidance scale (CFG): Value inf is greater than maximum value 30.0."),
])
def test_nan_and_inf_are_refused(served, value, message):
    values = {**BASE, "guidance_scale": value, "view": "x_t", "record_attention": False}
    reply = raw_call(served.url, "txt2img", values)
    assert reply.startswith("event: error\ndata: ")
    assert json.loads(reply.split("data: ", 1)[1])["error"] == message


@pytest.mark.parametrize("strength,message", [
    (0, "Strength (how much to change): Value 0 is less than minimum value 0.01."),
    (1.5, "Strength (how much to change): Value 1.5 is greater than maximum value 1.0."),
])
def test_strength_out_of_range(served, images, strength, message):
    with pytest.raises(Exception) as err:
        Client(served.url, verbose=False).predict(**BASE, image=handle_file(images["rgba.png"]), strength=strength,
                                                  api_name="/img2img")
    assert str(err.value) == message


@pytest.mark.parametrize("width,height", [(128, 64), (128, 128)])  # each side fine alone
def test_size_over_the_memory_budget(served, width, height):
    with pytest.raises(Exception) as err:
        Client(served.url, verbose=False).predict(**{**BASE, "width": width, "height": height}, api_name="/txt2img")
    assert str(err.value) == (f"width: {width}x{height} is more than this server's budget of 4096 pixels; "
                              "lower width or height")


@pytest.mark.parametrize("name,note", [
    ("gray.png", "image: converted from L to RGB"),
    ("rgba.png", "image: converted from RGBA to RGB"),  # opaque: nothing to composite
    ("palette.png", "image: converted from P to RGB"),
    ("cmyk.jpg", "image: converted from CMYK to RGB"),
    ("one_pixel.png", "image: resized from 1x1 to 64x64"),
    ("sixteen_bit.png", "image: 16-bit grey (I;16) scaled to 8 bits: 0..65535 became 0..255"),
])
def test_odd_images_are_converted_and_run(served, images, name, note):
    updates = list(Client(served.url, verbose=False).submit(
        **BASE, image=handle_file(images[name]), strength=1.0, api_name="/img2img"))
    assert Image.open(updates[-1][OUT["final"]]).size == (64, 64)
    assert f"⚠ {note}" in updates[-1][OUT["info"]]  # the coercion is reported


@pytest.mark.parametrize("name,needle", [
    ("bomb.png", "image: is 9000x9000 (81 megapixels); the largest accepted is 40 megapixels"),
    ("truncated.png", "image: is not a readable image: decoding failed (image file is truncated"),
    ("not_an_image.png", "image: is not a readable image: not a PNG, JPEG, WEBP, GIF, BMP, TIFF file"),
])
def test_unusable_images_are_refused(served, images, name, needle):
    with pytest.raises(Exception) as err:
        Client(served.url, verbose=False).predict(**BASE, image=handle_file(images[name]), api_name="/img2img")
    assert needle in str(err.value)


def test_huge_upload_is_refused_before_decoding(served, images, monkeypatch):
    from PIL import ImageFile

    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), load(self))[1])
    with pytest.raises(Exception, match=re.escape("image: is 9000x9000 (81 megapixels)")):
        Client(served.url, verbose=False).predict(**BASE, image=handle_file(images["bomb.png"]), api_name="/img2img")
    assert (9000, 9000) not in decoded  # neither Gradio nor the app decoded it
    list(Client(served.url, verbose=False).submit(**BASE, image=handle_file(images["gray.png"]), strength=1.0,
                                                  api_name="/img2img"))
    assert (48, 40) in decoded  # the recorder sees the server's decodes




def test_16_bit_depth_map_case_reaches_the_pipeline_at_full_range(served, images):
    updates = list(Client(served.url, verbose=False).submit(
        **BASE, image=handle_file(images["rgba.png"]), depth_map=handle_file(str(CASES / "depth16.png")),
        strength=1.0, api_name="/depth2img"))
    shown = pixels(Image.open(updates[-1][OUT["depth"]]))[..., 0].astype(int)
    row = shown[shown.shape[0] // 2]
    assert (np.diff(row) <= 0).all() and row[0] - row[-1] > 200  # 60000 (near, light) down to 1000, in order
    assert "depth_map:" not in updates[-1][OUT["info"]]  # used as sent: nothing to say about it


@pytest.mark.parametrize("name,note", [
    ("gray16.png", "image: 16-bit grey (I;16) scaled to 8 bits: 0..65535 became 0..255"),
    ("rgba_transparent.png", "image: its transparent areas (RGBA) were composited on white, as AUTOMATIC1111 does"),
])
def test_case_images_run_with_their_note(served, name, note):
    final = list(Client(served.url, verbose=False).submit(
        **BASE, image=handle_file(str(CASES / name)), strength=1.0, api_name="/img2img"))[-1]
    assert f"\n\n⚠ {note}\n\n" in final[OUT["info"]]  # before the line saying where the run is saved


def test_strength_that_runs_no_step_is_a_clear_error(served, images):
    with pytest.raises(Exception, match=re.escape(
            "strength: 1 steps at strength 0.75 run no step: img2img runs int(steps × strength) = int(0.75) = 0 of "
            "them; raise steps to 2 or strength to 1.0")):
        Client(served.url, verbose=False).predict(**{**BASE, "steps": 1}, image=handle_file(images["gray.png"]),
                                                  strength=0.75, api_name="/img2img")


def test_info_line_counts_the_steps_that_run(served, images):
    updates = list(Client(served.url, verbose=False).submit(**BASE, image=handle_file(images["gray.png"]),
                                                            strength=0.5, api_name="/img2img"))
    assert len(updates[-1][OUT["gallery"]]) == STEPS // 2
    assert f"· {STEPS // 2} of {STEPS} steps (strength 0.5) ·" in updates[-1][OUT["info"]]


def test_depth_map_of_another_size_and_dtype_is_resized(served, images, tmp_path):
    depth = np.zeros((30, 50), np.uint16)
    depth[:, 25:] = 40000
    Image.fromarray(depth).save(tmp_path / "d.png")
    updates = list(Client(served.url, verbose=False).submit(
        **BASE, image=handle_file(images["rgba.png"]), depth_map=handle_file(str(tmp_path / "d.png")),
        strength=1.0, api_name="/depth2img"))
    shown = pixels(Image.open(updates[-1][OUT["depth"]]))[..., 0].astype(int)
    assert shown[:, -3:].mean() > shown[:, :3].mean() + 100  # right half raised, as uploaded
    assert "⚠ depth_map: resized from 50x30 to 64x64" in updates[-1][OUT["info"]]


def test_flat_depth_map_is_refused(served, images, tmp_path):
    Image.new("L", (64, 64), 7).save(tmp_path / "flat.png")
    with pytest.raises(Exception, match=re.escape("depth_map: is flat (one value everywhere); it must show what is "
                                                  "near and far")):
        Client(served.url, verbose=False).predict(**BASE, image=handle_file(images["rgba.png"]),
                                                  depth_map=handle_file(str(tmp_path / "flat.png")),
                                                  api_name="/depth2img")


@pytest.mark.parametrize("prompt", ["", "ein Kreis, 円, круг 🌀", 12])  # a number is taken as its text
def test_empty_and_non_ascii_prompts_run(served, prompt):
    updates = list(Client(served.url, verbose=False).submit(**{**BASE, "prompt": prompt}, api_name="/txt2img"))
    assert len(updates[-1][OUT["gallery"]]) == STEPS and updates[-1][OUT["final"]]


def test_long_prompt_is_truncated_and_says_so(served):
    prompt = "a very long prompt " * 30  # one token per character with this tokenizer
    final = list(Client(served.url, verbose=False).submit(**{**BASE, "prompt": prompt}, api_name="/txt2img"))[-1]
    assert "prompt: " in final[OUT["info"]] and "CLIP reads 77; cut off" in final[OUT["info"]]


def test_python_api_validates_the_same_way():
    with pytest.raises(ValueError, match="steps: must be between 1 and 150"):
        validate_request({**BASE, "mode": "txt2img", "steps": 500})
    with pytest.raises(ValueError, match="scheduler: unknown value 'Heun"):
        validate_request({**BASE, "mode": "txt2img", "scheduler": "Heun++"})


def test_unknown_preset_is_a_clear_exit():
    assert "--preset 'nope' is unknown or does not fit 'bundled'; choose one of" in app_exit("--preset", "nope")


def test_still_serving_after_all_that(served):
    assert len(Client(served.url, verbose=False).predict(**BASE, api_name="/txt2img")[OUT["gallery"]]) == STEPS


# -- load ----------------------------------------------------------------------

def test_eight_clients_three_runs_each_no_cross_talk(served):
    seeds = {(c, r): 100 + 10 * c + r for c in range(8) for r in range(3)}
    references = {}
    for key, seed in seeds.items():
        req = validate_request({**BASE, "mode": "txt2img", "seed": seed})
        references[key] = pixels([o for o in generate(req, served.cache, source=served.source)][-1].image)

    def client_runs(c):
        # the final image as the server sent it (its path here), not every step's files downloaded; and
        # result(), not iterating: a job's iterator polls every 1 ms, on the cores the app needs
        client = Client(served.url, verbose=False, download_files=False)
        got = {}
        for r in range(3):
            final = client.submit(**{**BASE, "seed": seeds[(c, r)]}, api_name="/txt2img").result()
            got[(c, r)] = pixels(Image.open(final[OUT["final"]]["path"]))
        return got

    with futures.ThreadPoolExecutor(8) as pool:
        results = {}
        for got in pool.map(client_runs, range(8)):
            results.update(got)
    assert len(results) == 24
    for key, image in results.items():
        assert np.array_equal(image, references[key]), f"client {key[0]} run {key[1]} got another run's image"


def test_one_clients_stop_leaves_a_concurrent_run_alone(served, monkeypatch):
    stopper, other = Client(served.url, verbose=False), Client(served.url, verbose=False)
    reference = pixels([o for o in generate(validate_request({**BASE, "mode": "txt2img", "seed": 77, "steps": 30}),
                                            served.cache, source=served.source)][-1].image)
    gate = hold_at_first_step(served.cache, served.source, monkeypatch)
    theirs = other.submit(**{**BASE, "seed": 77, "steps": 30}, api_name="/txt2img")
    wait_for(lambda: served.cache.run_lock.locked(), "their run to start")
    mine = stopper.submit(**{**BASE, "steps": 150}, api_name="/txt2img")  # queued behind theirs
    wait_for(lambda: mine.status().code == Status.IN_QUEUE, "my run to be queued")
    stopper.predict(api_name="/stop")  # takes mine out of the queue; theirs runs on
    gate.set()
    with pytest.raises(Exception, match="Stopped before it started"):
        mine.result()
    final = theirs.result()
    assert np.array_equal(pixels(Image.open(final[OUT["final"]])), reference)


def test_queue_full_is_a_clear_refusal(tiny_dir, monkeypatch):
    cache = ModelCache(device="cpu")
    demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir)]), cache)
    demo.queue(max_size=1)
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    try:
        clients = [Client(demo.local_url, verbose=False) for _ in range(4)]
        gate = hold_at_first_step(cache, str(tiny_dir), monkeypatch)  # the first run holds the device
        running = clients[0].submit(**BASE, api_name="/txt2img")
        wait_for(lambda: cache.run_lock.locked(), "the first run to start")
        queued = clients[1].submit(**BASE, api_name="/txt2img")
        wait_for(lambda: queued.status().code == Status.IN_QUEUE, "the second run to be queued")
        for refused in [c.submit(**BASE, api_name="/txt2img") for c in clients[2:]]:  # the queue holds one
            with pytest.raises(Exception, match="(?i)queue is full"):
                refused.result(timeout=60)
        gate.set()
        assert all(job.result(timeout=120)[OUT["final"]] for job in (running, queued))  # both ran to the end
    finally:
        demo.close()


# -- faults --------------------------------------------------------------------

def test_out_of_memory_is_a_clear_error_and_the_next_run_works(served, monkeypatch):
    unet = served.cache.pipeline("txt2img", served.source).unet
    calls = {"n": 0}
    original = unet.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", failing_forward)
    with pytest.raises(Exception, match="ran out of memory at 64x64; lower width and height"):
        Client(served.url, verbose=False).predict(**BASE, api_name="/txt2img")
    assert not served.cache.run_lock.locked()
    assert len(Client(served.url, verbose=False).predict(**BASE, api_name="/txt2img")[OUT["gallery"]]) == STEPS


def test_out_of_memory_through_the_python_api(served, monkeypatch):
    unet = served.cache.pipeline("txt2img", served.source).unet
    monkeypatch.setattr(unet, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(GenerationError, match="ran out of memory"):
        list(generate(validate_request({**BASE, "mode": "txt2img"}), served.cache, source=served.source))


def test_client_that_disconnects_mid_run_stops_its_run(served):
    code = (
        "import os\nfrom gradio_client import Client\n"
        f"job = Client({served.url!r}, verbose=False).submit(prompt='x', seed=1, steps=150, width=64, height=64,"
        " api_name='/txt2img')\n"
        "for update in job:\n    os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)
    wait_for(lambda: not served.cache.run_lock.locked(), "the run to end")
    # its frames, not a clock: a tiny-model step takes tens of ms, so a run that went on to the end
    # would also have freed the lock by now
    run = max(p for p in served.demo.run_store.root.iterdir() if p.is_dir())  # folders sort by creation
    saved = len(list(run.glob("step_*.jpg")))
    assert 1 <= saved < 150, f"the run went on after its client left ({saved} of 150 steps)"


# -- security ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd",
                                  os.path.abspath(__file__)])
def test_files_outside_the_cache_cannot_be_read(served, path):
    response = httpx.get(f"{served.url}gradio_api/file={path}")
    assert response.status_code in (403, 404) and "root:" not in response.text


def test_uploads_over_the_size_limit_are_refused(served):
    big = b"\0" * (21 * 1024 * 1024)
    response = httpx.post(f"{served.url}gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code == 413


def test_share_warns_and_survives_offline(caplog):
    class Offline:  # a share tunnel that cannot open, as on a machine without internet
        def __init__(self):
            self.launched = []

        def launch(self, share, **options):
            if share:
                raise OSError("no network")
            self.launched.append(options)

    demo = Offline()
    app_module.serve(app_module.parse_args(["--share"]), demo)
    [local] = demo.launched
    assert local["server_name"] == "127.0.0.1" and local["server_port"] == 7860
    assert "PUBLIC link" in caplog.text and "--auth" in caplog.text
    assert "could not open a share link (no network); serving on 127.0.0.1:7860 only" in caplog.text


def test_gradio_has_the_2026_security_fixes():
    import gradio

    major, minor = (int(x) for x in gradio.__version__.split(".")[:2])
    assert (major, minor) >= (6, 24)
    pin = next(line for line in open("requirements.txt") if line.startswith("gradio=="))
    assert tuple(int(x) for x in pin.split("==")[1].split(".")[:2]) >= (6, 24)


@pytest.mark.parametrize("interval,delay", [(60.0, 0.0), (0.05, 0.1)])
def test_steps_faster_than_the_update_interval_share_an_update_and_the_gallery_keeps_every_step(
        served, tmp_path, monkeypatch, interval, delay):
    """Steps that come faster than ui.events.UPDATE_INTERVAL wait for the next update (the first step and
    the final image never wait); slower ones each get their own. Every step is in the final gallery."""
    monkeypatch.setattr(events, "UPDATE_INTERVAL", interval)

    def paced(req, token):
        for item in generate(req, served.cache, token, source=served.source):
            time.sleep(delay)
            yield item

    handler = Runner(paced, RunStore(tmp_path), Limits(), "tiny").handler("txt2img")
    updates = list(handler(SimpleNamespace(session_hash="s"), **BASE))
    previews = [u[OUT["preview"]] for u in updates[:-1]]
    shown = [1] if delay < interval else list(range(1, STEPS + 1))
    assert [int(p[-8:-4]) for p in previews] == shown  # step_0001.jpg ...
    assert [caption.split(" · ")[0] for _, caption in updates[-1][OUT["gallery"]]] == \
        [f"step {i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert updates[-1][OUT["final"]].endswith("final.png")


# -- disk ----------------------------------------------------------------------

def test_step_images_do_not_pile_up(served, tmp_path):
    root = tmp_path / "runs"

    def one_step(req, token):
        return generate(req, served.cache, token, source=served.source)

    runner = Runner(one_step, RunStore(root, keep=8), Limits(), "tiny")
    handler = runner.handler("txt2img")
    for i in range(100):
        list(handler(SimpleNamespace(session_hash=f"s{i}"), **{**BASE, "steps": 1, "seed": i}))
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 8
    assert sum(f.stat().st_size for f in root.rglob("*")) < 8 * 200_000
