import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app as app_module
from pipelines import ModelCache, validate_request
from pipelines.tiny import save_tiny_checkpoint, save_tiny_family


# Small input files from real bug reports: ../shared/cases beside the checkout (CI lays it there too)
CASES = Path(__file__).resolve().parents[2] / "shared" / "cases"


@pytest.fixture(scope="session", autouse=True)
def outputs_default(tmp_path_factory):
    """Apps the tests build save their runs here, not in the checkout's outputs/ (--outputs' default)."""
    app_module.DEFAULT_OUTPUTS = tmp_path_factory.mktemp("outputs")
    return app_module.DEFAULT_OUTPUTS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random checkpoint in the bundled layout (txt2img + depth + tiny VAE)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory):
    """family -> folder of a tiny random pipeline of that family ("sd", "sdxl", "sd3", "flux"), each built once
    a session (seed 0)."""
    built = {}

    def folder(family: str):
        if family not in built:
            built[family] = save_tiny_family(tmp_path_factory.mktemp(f"tiny-{family}") / "ckpt", family)
        return built[family]

    return folder


@pytest.fixture
def serve_tiny(tiny_dir, cache):
    """serve_tiny(*flags): `python app.py --model <tiny> *flags` as create_demo builds it, launched on
    localhost; every app it started is closed after the test."""
    import app as app_module

    demos = []

    def start(*flags):
        demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir), *flags]), cache)
        demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_dir):
    """The app on the tiny model, served on localhost for this test module (its own cache)."""
    demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir)]),
                                  ModelCache(device="cpu"))
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="session")
def cache():
    return ModelCache(device="cpu")


@pytest.fixture
def scene():
    """A 64x64 test picture: a red square on blue."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (30, 40, 200)
    pixels[16:48, 16:48] = (220, 30, 30)
    return Image.fromarray(pixels)


@pytest.fixture
def make_request(scene):
    def make(mode="txt2img", **overrides):
        raw = dict(mode=mode, prompt="a red square", negative_prompt="", seed=3, steps=6, guidance_scale=5.0,
                   width=64, height=64, scheduler="Euler", preview="latent-rgb", view="x_t", strength=0.7)
        if mode != "txt2img":
            raw["image"] = scene
        raw.update(overrides)
        return validate_request(raw)

    return make


def app_exit(*argv: str) -> str:
    """`python app.py *argv` run in this process up to its exit: the message it exits with (SystemExit).
    Fails if it would have served instead. This process keeps its torch thread count."""
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exited:
            mp.setattr(app_module, "serve", lambda *_: pytest.fail(f"app.py {' '.join(argv)} would have served"))
            app_module.main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return str(exited.value.code)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if not isinstance(image, np.ndarray) else image)


torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # lets fixtures see whether the test failed (the browser tests screenshot failures)
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
