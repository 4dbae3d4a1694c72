"""Every event a user can trigger says in the page what happened.

The page's own events are private (gradio_client will not call them), so these tests fire
them the way the browser's client does: through the queue (SSE) for a queued event, or a
POST to /run/predict for one that skips the queue, where gr.Info/gr.Warning are dropped and
a gr.Error comes back as an HTTP 500 whose text the page does not show. What the page would
show is what comes back.
"""

import json
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image, PngImagePlugin

import app as app_module
from pipelines import Limits, ModelCache
from ui import AppSpec, build_app
from ui.events import API_OUTPUTS

from .conftest import CASES, free_port

CASE = CASES / "a1111_dynprompts.png"  # the file; rebuilt from its text where absent
DYNPROMPTS = ("a cat, masterpiece\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, "
              "Size: 512x768, Model hash: abc, Model: v1-5\nTemplate: a {cat|dog}, masterpiece\n"
              "Negative Template: ugly")


def png(path: Path, parameters: str | None) -> Path:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def fire(url: str, elem_id: str, trigger: str, data: list, session: str | None = None) -> dict:
    """Trigger `elem_id`'s `trigger` event as the page does; return what the page receives:
    its toasts as (level, text), and either the outputs or the error text."""
    config = httpx.get(f"{url}config").json()
    target = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)
    dep = next(d for d in config["dependencies"] if [target, trigger] in d["targets"])
    data = data + [None] * (len(dep["inputs"]) - len(data))  # gr.State inputs: the page sends null, the server fills
    body = {"data": data, "fn_index": dep["id"], "trigger_id": target, "event_data": None,
            "session_hash": session or uuid.uuid4().hex}
    if not dep["queue"]:  # the page shows no toast and no error text for these (seen in Chromium): only "Error"
        reply = httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=60)
        return {"toasts": [], "outputs": reply.json().get("data"), "error": None, "status": reply.status_code}
    httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=60).raise_for_status()
    toasts, done = [], None
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": body["session_hash"]},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg["msg"] == "log":
                toasts.append((msg["level"], msg["log"]))
            elif msg["msg"] == "process_completed":
                done = msg
            elif msg["msg"] in ("close_stream", "unexpected_error"):
                break
    assert done is not None, "the event never completed"
    return {"toasts": toasts, "outputs": done["output"].get("data"), "error": done["output"].get("error"),
            "status": 200}


def upload(url: str, path: Path) -> dict:
    with open(path, "rb") as f:
        server_path = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, f)}).json()[0]
    return {"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def load(url: str, path: Path) -> dict:
    return fire(url, "load-png", "upload", [upload(url, path)])


@pytest.fixture
def dynprompts(tmp_path) -> Path:
    return CASE if CASE.exists() else png(tmp_path / "dyn.png", DYNPROMPTS)


def test_loading_a_png_without_settings_says_so_and_leaves_the_controls(url, tmp_path):
    got = load(url, png(tmp_path / "plain.png", None))
    message = ("No settings loaded: this image carries no generation settings that sd-parsers reads "
               "(AUTOMATIC1111, ComfyUI, Fooocus, InvokeAI or NovelAI metadata).")
    assert got["error"] is None and got["toasts"] == [("warning", message)]
    *controls, note = got["outputs"]
    assert note == message and all(value == {"__type__": "update"} for value in controls)  # untouched


def test_loaded_settings_are_listed_with_what_was_not_loaded(url, dynprompts):
    got = load(url, dynprompts)
    loaded = ("Loaded from AUTOMATIC1111 (made with model v1-5): prompt, negative prompt, seed 1234, steps 20, "
              "CFG 7.0, scheduler Euler a.")
    not_loaded = ["line after the settings line, not loaded: Template: a {cat|dog}, masterpiece",
                  "line after the settings line, not loaded: Negative Template: ugly",
                  # the served model is 32 px (sides 16..128): its limits, not SD's
                  "size 512x768 does not fit the loaded model (width: must be between 16 and 128, got 512): kept yours"]
    assert got["toasts"] == [("info", loaded), ("warning", "; ".join(not_loaded))]
    skip = {"__type__": "update"}
    assert got["outputs"][:8] == ["a cat, masterpiece", "ugly", 1234, 20, 7.0, skip, skip, "Euler a"]
    assert got["outputs"][-1] == f"**{loaded}**" + "".join(f"\n- {n}" for n in not_loaded)


def test_a_sampler_the_app_lacks_is_said_in_the_page(url, tmp_path):
    got = load(url, png(tmp_path / "sde.png", "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ SDE, "
                                              "Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64"))
    assert got["toasts"][1] == ("warning", "sampler DPM++ SDE with schedule type Karras is not offered here: "
                                           "kept your scheduler")
    assert got["outputs"][7] == {"__type__": "update"}  # the scheduler control keeps its value


def test_loaded_strength_goes_to_both_strength_sliders(url, tmp_path):
    got = load(url, png(tmp_path / "img2img.png", "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, "
                                                   "CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.35"))
    assert got["toasts"] == [("info", "Loaded from AUTOMATIC1111: prompt, negative prompt, seed 1, steps 20, CFG 7.0, "
                                      "size 64x64, scheduler Euler a, strength 0.35.")]
    # the setters: prompt .. view (shared by the tabs), then img2img's strength and the depth tab's
    assert got["outputs"][:8] == ["a cat", "ugly", 1, 20, 7.0, 64, 64, "Euler a"]
    assert got["outputs"][10:12] == [0.35, 0.35]


def test_download_before_any_run_says_to_run_first(url):
    got = fire(url, "export-gif", "click", [None, None])
    assert got["error"] == "Nothing to export yet: run a generation first, then download its steps."


@pytest.mark.parametrize("elem_id,message", [
    ("send-img2img", "No final image yet: generate one, then send it."),
    ("send-depth", "No final image yet: generate one, then send it."),
])
def test_sending_before_any_run_says_so_and_keeps_the_tab(url, elem_id, message):
    got = fire(url, elem_id, "click", [None])
    assert got["toasts"] == [("warning", message)] and got["outputs"] == [{"__type__": "update"}] * 2


def test_reusing_the_last_seed_before_any_run_keeps_the_seed(url):
    got = fire(url, "seed-reuse", "click", [None])
    assert got["toasts"] == [("warning", "No run in this session yet: the seed stays as it is.")]
    assert got["outputs"] == [{"__type__": "update"}]


def test_every_page_event_is_queued_outside_the_gpu_group(tiny_dir):
    demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir)]), ModelCache(device="cpu"))
    private = [fn for fn in demo.fns.values() if fn.api_visibility == "private"]
    assert len(private) >= 15
    for fn in private:
        assert fn.queue and fn.concurrency_id == "ui" and fn.concurrency_limit is None, fn.name


def test_loaded_size_is_checked_against_the_servers_limits(tmp_path, dynprompts):
    spec = AppSpec(generate=lambda request, token: iter(()), model_label="none", run_root=str(tmp_path / "runs"),
                   limits=Limits(max_side=256))
    demo = build_app(spec).queue()
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    try:
        got = load(demo.local_url, dynprompts)
    finally:
        demo.close()
    assert got["outputs"][5:7] == [{"__type__": "update"}] * 2
    assert ("size 512x768 does not fit the loaded model (width: must be between 64 and 256, got 512): kept yours"
            in got["toasts"][1][1])


def test_run_endpoints_keep_their_positional_api(tmp_path):
    """gradio_client callers pass and read these by position: FIELDS' and RunUpdate's order must not move."""
    demo = build_app(AppSpec(generate=lambda request, token: iter(()), model_label="none", run_root=str(tmp_path)))
    endpoints = demo.get_api_info()["named_endpoints"]
    common = ["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler", "preview",
              "view"]
    for name, extra, returns in [("txt2img", [], 6), ("img2img", ["image", "strength"], 6),
                                 ("depth2img", ["image", "strength", "depth_map"], 7)]:
        api = endpoints[f"/{name}"]
        assert [p["parameter_name"] for p in api["parameters"]] == common + extra + ["record_attention"]
        assert len(api["returns"]) == returns
    assert API_OUTPUTS == {"preview": 0, "gallery": 1, "final": 2, "status": 3, "info": 4, "tensors": 5, "depth": 6}
