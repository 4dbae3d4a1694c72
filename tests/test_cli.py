"""`python app.py` as a user runs it: a real process on the bundled model, serving on localhost."""

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from .conftest import CASES, app_exit  # CASES: ../shared/cases, the issue-16 inputs
from .test_app import OUT, free_port
from .test_messages import load, png

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app_py(tmp_path_factory):
    """`python app.py --port N --outputs DIR` (the bundled model; runs saved outside the checkout); its output
    goes to a file."""
    tmp = tmp_path_factory.mktemp("app_py")
    port, log, outputs = free_port(), tmp / "output.txt", tmp / "outputs"
    env = dict(os.environ, STEPWISE_CACHE=str(tmp), GRADIO_TEMP_DIR=str(tmp / "gradio"), PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--outputs", str(outputs)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"app.py exited: {log.read_text()}"
            assert time.monotonic() < deadline, "app.py did not start serving within 120 s"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield SimpleNamespace(url=url, port=port, log=log, outputs=outputs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_python_app_py_serves_the_default_model_and_streams(app_py):
    saved = set(app_py.outputs.glob("*/*/run.json"))
    updates = list(Client(app_py.url, verbose=False).submit(prompt="a red circle", seed=1, steps=4, width=64, height=64,
                                                            api_name="/txt2img"))
    assert updates[0][OUT["preview"]].endswith("step_0001.jpg") and len(updates[-1][OUT["gallery"]]) == 4
    assert updates[-1][OUT["final"]].endswith("final.png")
    assert len(set(app_py.outputs.glob("*/*/run.json")) - saved) == 1  # the run is saved


# -- the issue-16 case files, through gradio_client (the settings file through the page's own event) ----

RUN = dict(prompt="a red circle on the left, blue background", negative_prompt="", seed=7, guidance_scale=4.0,
           width=64, height=64, scheduler="DDIM", preview="full-vae", view="x0")


def test_16_bit_depth_map_case_is_used_at_its_full_range(app_py):
    final = list(Client(app_py.url, verbose=False).submit(
        **dict(RUN, width=128, height=128), steps=8, image=handle_file(str(CASES / "rgba_transparent.png")),
        depth_map=handle_file(str(CASES / "depth16.png")), strength=1.0, api_name="/depth2img"))[-1]
    shown = np.asarray(Image.open(final[OUT["depth"]]).convert("L")).astype(int)
    # 60000 (near, left) down to 1000 (far, right), at the 16x16 latents: every level from white to black
    # in order; cut to 8 bits it was refused as flat (all 255), or a map with values under 255 lost the rest
    assert shown.shape == (16, 16) and np.abs(shown - np.arange(255, -1, -17)).max() <= 1
    # the 64x64 case runs at the bundled model's 128x128: its size is the one thing to say about it
    notes = [line for line in final[OUT["info"]].splitlines() if "depth_map:" in line]
    assert notes == ["⚠ depth_map: resized from 64x64 to 128x128"], notes


def img2img(url: str, case: str) -> tuple[np.ndarray, str]:
    """The case file through /img2img at strength 0.3 (3 of 10 steps), so the output keeps the input's
    light and dark: (final pixels (64, 64, 3) int, info line)."""
    final = list(Client(url, verbose=False).submit(**RUN, steps=10, image=handle_file(str(CASES / case)), strength=0.3,
                                                   api_name="/img2img"))[-1]
    return np.asarray(Image.open(final[OUT["final"]]).convert("RGB")).astype(int), final[OUT["info"]]


def test_16_bit_grey_case_is_scaled_to_8_bits_with_a_note(app_py):
    pixels, info = img2img(app_py.url, "gray16.png")
    # the 0..65535 ramp (dark left, light right) survives: measured 65 and 163; clipped to 8 bits, as
    # Gradio's gr.Image did, the input is white from its 255th value on and both sides came out about 245
    assert pixels[:, :8].mean() < 100 and pixels[:, -8:].mean() > 130
    assert "\n\n⚠ image: 16-bit grey (I;16) scaled to 8 bits: 0..65535 became 0..255\n\n" in info


def test_transparent_case_is_composited_on_white_with_a_note(app_py):
    pixels, info = img2img(app_py.url, "rgba_transparent.png")
    # the transparent corners: measured 239 on white; about 18 when transparency turned black
    assert pixels[:6, :6].mean() > 200 and pixels[-6:, -6:].mean() > 200
    assert "\n\n⚠ image: its transparent areas (RGBA) were composited on white, as AUTOMATIC1111 does\n\n" in info


def test_dynamic_prompts_settings_case_loads_its_settings_and_reports_the_template_lines(app_py):
    got = load(app_py.url, CASES / "a1111_dynprompts.png")  # "Load settings" is a page event: not in the API
    loaded = ("Loaded from AUTOMATIC1111 (made with model v1-5): prompt, negative prompt, seed 1234, steps 20, "
              "CFG 7.0, scheduler Euler a.")
    not_loaded = ["line after the settings line, not loaded: Template: a {cat|dog}, masterpiece",
                  "line after the settings line, not loaded: Negative Template: ugly",
                  # the bundled model is 128 px (sides 16..512)
                  "size 512x768 does not fit the loaded model (height: must be between 16 and 512, got 768): "
                  "kept yours"]
    assert got["error"] is None and got["toasts"] == [("info", loaded), ("warning", "; ".join(not_loaded))]
    skip = {"__type__": "update"}
    assert got["outputs"][:8] == ["a cat, masterpiece", "ugly", 1234, 20, 7.0, skip, skip, "Euler a"]


def test_a_loaded_sampler_the_bundled_model_does_not_offer_is_said(app_py, tmp_path):
    got = load(app_py.url, png(tmp_path / "karras.png", "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
                                                        "CFG scale: 7, Seed: 1, Size: 64x64"))
    assert got["toasts"][1] == ("warning", "the file has no negative prompt: kept yours; scheduler DPM++ 2M Karras is "
                                           "not offered for this model: kept yours")  # zero terminal SNR
    assert got["outputs"][5:8] == [64, 64, {"__type__": "update"}]


def test_output_is_one_line_with_the_flag_to_share(app_py):
    """What app.py printed from its start through every run above and an estimated-depth run (the
    depth estimator's image processor loads then): no torchvision warnings, no share=True hint."""
    list(Client(app_py.url, verbose=False).submit(**RUN, steps=2, image=handle_file(str(CASES / "gray16.png")),
                                                  strength=1.0, api_name="/depth2img"))
    assert app_py.log.read_text() == (f"Stepwise serving on http://127.0.0.1:{app_py.port} (--share for a public link); "
                                      f"saving runs in {app_py.outputs}\n")


def test_unknown_model_exits_with_a_clear_message():
    assert "error: model 'nobody/missing-model' is not in the local Hugging Face cache" in app_exit(
        "--model", "nobody/missing-model")
