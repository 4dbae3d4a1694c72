"""Frames as messages between processes (pipelines.wire), and the app's worker path without Ray."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

import app as app_module
from pipelines import Final, GenerationError, ModelCache, ModelLoadError, generate, validate_request, wire
from pipelines.generate import Frame
from ui.events import API_OUTPUTS as OUT

from .conftest import free_port, pixels
from .test_generate import bare_call, bare_pipeline

COPIES = ("t", "xt_pixels", "x0_pixels", "latents", "depth_pixels", "start_pixels", "start_latents", "x0",
          "noise_pred", "noise_pred_text", "noise_pred_uncond", "attention")
PLAIN = (int, float, str, bytes, bool, type(None))


def plain(value) -> bool:
    """Only values any process can read: no pickled torch, numpy or PIL objects."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, PLAIN)


@pytest.mark.parametrize("mode", ["txt2img", "depth2img"])
def test_every_frame_field_comes_back_bit_exact_from_plain_messages(tiny_dir, cache, scene, mode):
    req = validate_request({"mode": mode, "prompt": "a red square on the left", "seed": 5, "steps": 4,
                            "width": 64, "height": 64, "guidance_scale": 5.0, "record_attention": True,
                            **({"image": scene, "strength": 0.75} if mode != "txt2img" else {})})
    items = list(generate(req, cache, source=str(tiny_dir)))
    messages = [wire.message(item) for item in items]
    assert all(plain(m) for m in messages)
    reader = wire.Reader(req, str(tiny_dir))
    back = [reader.read(m) for m in messages]
    for made, read in zip(items[:-1], back[:-1], strict=True):
        assert isinstance(read, Frame)
        for name in COPIES:
            a, b = getattr(made, name), getattr(read, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.tensor().dtype == b.tensor().dtype and torch.equal(a.tensor(), b.tensor()), name
        assert (read.step, read.total, read.view, read.seconds, read.caption, read.tokens) == \
               (made.step, made.total, made.view, made.seconds, made.caption, made.tokens)
        assert read.schedule_levels() == made.schedule_levels() and read.sigma == made.sigma
        assert read.schedule.prediction_type == made.schedule.prediction_type
        assert torch.equal(read.latent_rgb.matrix, made.latent_rgb.matrix)
        assert [im.tobytes() for im, *_ in read.attention_overlays()] == \
               [im.tobytes() for im, *_ in made.attention_overlays()]
    assert items[0].attention is not None and (mode == "txt2img") == (items[0].depth_pixels is None)
    assert isinstance(back[-1], Final) and np.array_equal(pixels(back[-1].image), pixels(items[-1].image))
    assert (back[-1].seconds, back[-1].notes) == (items[-1].seconds, items[-1].notes)
    # compact: as pickled to travel, a step is its PNG pictures and tensor bytes plus a few hundred bytes
    step = messages[1]
    payload = len(step["tensors"]) + sum(map(len, step["pictures"].values()))
    assert payload < len(pickle.dumps(step, protocol=5)) < payload + 1024


def test_errors_travel_as_their_kind_with_their_message():
    reader = wire.Reader(None, "x")
    for err in (GenerationError("lower width"), ModelLoadError("pick another model"), ValueError("bad size")):
        with pytest.raises(type(err), match=str(err)):
            reader.read(wire.error(err))
    with pytest.raises(GenerationError, match="the worker failed: KeyError: 'unet'"):
        reader.read(wire.error(KeyError("unet")))


class Loopback:
    """The app's worker interface (`pipelines.workers.Workers`) in this process: every frame through a
    message and back, as a replica's would come."""

    concurrency = 3

    def __init__(self, cache: ModelCache):
        self.cache = cache

    def generate(self, request, cancel, source):
        reader = wire.Reader(request, source)
        for item in generate(request, self.cache, cancel, source=source):
            yield reader.read(wire.message(item))


def test_the_app_on_workers_streams_their_frames_and_lets_their_concurrency_run(tiny_dir, cache):
    args = app_module.parse_args(["--model", str(tiny_dir)])
    demo = app_module.create_demo(args, cache, Loopback(cache))
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    try:
        runs = [fn for fn in demo.fns.values() if fn.api_name in ("txt2img", "img2img", "depth2img")]
        assert {fn.concurrency_limit for fn in runs} == {Loopback.concurrency}
        settings = dict(prompt="a red square", negative_prompt="", seed=21, steps=5, guidance_scale=5.0, width=64,
                        height=64, scheduler="Euler", preview="full-vae")
        updates = list(Client(demo.local_url, verbose=False).submit(**settings, api_name="/txt2img"))
        assert len(updates[-1][OUT["gallery"]]) == settings["steps"]
        reference = bare_call(validate_request({"mode": "txt2img", **settings}),
                              bare_pipeline("txt2img", tiny_dir, "Euler"))
        assert np.array_equal(pixels(Image.open(updates[-1][OUT["final"]])), pixels(reference))
        saved = Path(updates[-1][OUT["info"]].split("Saved in `")[1].rstrip("`"))  # the outputs folder has it all
        assert len(list((saved / "steps").glob("x0_*.png"))) == settings["steps"]
    finally:
        demo.close()


def test_workers_flag_is_checked():
    with pytest.raises(SystemExit):
        app_module.parse_args(["--workers", "0"])
