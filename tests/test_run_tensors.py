"""Inside the denoiser on the bundled model: capture never changes the image, the guidance
pair adds up to what the scheduler received, and a run's tensors file holds what it says."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipelines import Final, Frame, ModelCache, generate, layout
from pipelines.export import save_run_tensors
from pipelines.request import validate_request

from .conftest import pixels
from .test_generate import bare_call, bare_pipeline

PROMPT = "a red circle on the left, blue background"
WORDS = ["a", "red", "circle", "on", "the", "left", ",", "blue", "background"]


@pytest.fixture(scope="module")
def micro():
    return ModelCache(device="cpu")


def micro_request(mode, scene, **overrides):
    raw = dict(mode=mode, prompt=PROMPT, seed=5, steps=8, guidance_scale=4.0, width=128, height=128, scheduler="DDIM",
               preview="latent-rgb", view="x0", strength=0.75)
    if mode != "txt2img":
        raw["image"] = scene
    return validate_request({**raw, **overrides})


def run(req, cache):
    out = list(generate(req, cache))
    return [o for o in out if isinstance(o, Frame)], next(o for o in out if isinstance(o, Final))


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "depth2img"])
def test_recording_changes_no_pixel_and_matches_the_bare_pipeline(micro, scene, mode):
    req = micro_request(mode, scene)
    off_frames, off = run(req, micro)
    on_frames, on = run(micro_request(mode, scene, record_attention=True), micro)
    bare = bare_call(req, bare_pipeline(mode, layout.BUNDLED_FOLDER, "DDIM"))
    assert np.array_equal(pixels(on.image), pixels(off.image))
    assert np.array_equal(pixels(on.image), pixels(bare))
    # every step's pictures too, and the maps only where asked for
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(on_frames, off_frames))
    assert all(f.attention is None and f.tokens == () for f in off_frames)
    assert len(on_frames) == req.denoising_steps
    assert all(f.attention.tensor().shape == (len(WORDS), 16, 16) and f.tokens == tuple(WORDS) for f in on_frames)


@pytest.mark.parametrize("scheduler", ["DDIM", "Euler a", "DPM++ 2M"])
def test_the_guidance_pair_adds_up_to_what_the_scheduler_received(micro, scene, scheduler):
    req = micro_request("txt2img", scene, scheduler=scheduler, guidance_scale=6.5)
    frames, _ = run(req, micro)
    for f in frames:
        uncond, text = f.noise_pred_uncond.tensor(), f.noise_pred_text.tensor()
        assert torch.equal(uncond + req.guidance_scale * (text - uncond), f.noise_pred.tensor())
        assert not torch.equal(uncond, text)  # the prompt moves the prediction


def test_without_guidance_there_is_no_pair(micro, scene):
    frames, _ = run(micro_request("txt2img", scene, guidance_scale=1.0), micro)
    assert all(f.noise_pred_text is None and f.noise_pred_uncond is None for f in frames)
    assert all(f.noise_pred.tensor().shape == (1, 4, 16, 16) for f in frames)


def test_attention_maps_are_distributions_over_the_text(micro, scene):
    frames, _ = run(micro_request("txt2img", scene, record_attention=True), micro)
    for f in frames:
        maps = f.attention.tensor().float()
        assert maps.dtype == torch.float32 and (maps >= 0).all()
        # the prompt's tokens take a share of each pixel's attention; the markers and padding the rest
        assert (maps.sum(0) <= 1 + 1e-3).all() and maps.sum(0).min() > 0
        assert not torch.equal(maps[1], maps[2])  # words look at different places


def test_the_run_tensors_file_has_every_documented_key_and_shape(micro, scene, tmp_path):
    req = micro_request("img2img", scene, record_attention=True)
    frames, final = run(req, micro)
    n = req.denoising_steps
    path = save_run_tensors(frames, tmp_path / "run.safetensors", {"settings": req.settings()})
    with safe_open(str(path), framework="pt") as f:
        run_tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = f.metadata()
    shapes = {key: tuple(t.shape) for key, t in run_tensors.items()}
    latent = (4, 16, 16)
    assert shapes == {"latents": (n + 1, *latent), "x0": (n, *latent), "noise_pred": (n, *latent),
                      "noise_pred_text": (n, *latent), "noise_pred_uncond": (n, *latent), "timesteps": (n,),
                      "noise_level": (n,), "attention": (n, len(WORDS), 16, 16)}
    assert run_tensors["attention"].dtype == torch.float16 and run_tensors["x0"].dtype == torch.float32
    assert json.loads(meta["tokens"]) == WORDS and json.loads(meta["settings"])["seed"] == 5
    # the same values the frames hold, in step order, the start first
    assert torch.equal(run_tensors["latents"][0], frames[0].start_latents.tensor()[0])
    assert torch.equal(run_tensors["noise_pred"][2], frames[2].noise_pred.tensor()[0])
    assert run_tensors["timesteps"].tolist() == [f.timestep for f in frames]
    levels = run_tensors["noise_level"]
    assert (levels[1:] < levels[:-1]).all() and 0 < levels[-1] < levels[0] < 1  # img2img starts part-way
    # DDIM's last step lands next to its last x0 estimate: it keeps sqrt(1 - alphas_cumprod[0]) = 0.03 of noise
    # (set_alpha_to_one is off), so they differ by about 0.03 x |noise_pred|, where the first x_t is far from x0
    last = (run_tensors["x0"][-1] - run_tensors["latents"][-1]).abs().max()
    assert last < 0.1 < (run_tensors["x0"][0] - run_tensors["latents"][0]).abs().max()


def test_a_run_through_the_app_returns_its_tensors_file(url):
    from gradio_client import Client

    from ui.events import API_OUTPUTS as OUT

    client = Client(url, download_files=False, verbose=False)
    job = client.submit(prompt="a red square", seed=1, steps=4, guidance_scale=3.0, width=64, height=64,
                        scheduler="DDIM", record_attention=True, api_name="/txt2img")
    last = list(job)[-1]
    assert last[OUT["tensors"]]["url"].endswith(".safetensors")
    path = last[OUT["tensors"]]["path"]
    with safe_open(path, framework="np") as f:
        assert f.get_slice("attention").get_shape()[:1] == [4] and f.get_slice("latents").get_shape()[0] == 5
    with pytest.raises(Exception, match="record_attention: must be true or false, got 'yes'"):
        client.predict(prompt="p", width=64, height=64, record_attention="yes", api_name="/txt2img")


def test_an_empty_prompt_records_no_maps_and_says_so(micro, scene):
    frames, final = run(micro_request("txt2img", scene, prompt="", record_attention=True), micro)
    assert all(f.attention is None and f.tokens == () for f in frames)
    assert "record_attention: the prompt has no tokens, so there are no maps to record" in final.notes


def test_a_prompt_past_the_models_own_token_limit_is_noted_at_that_limit(micro, scene):
    # the bundled tokenizer reads 32 tokens (its model_max_length), not CLIP's usual 77
    frames, final = run(micro_request("txt2img", scene, prompt=" ".join([PROMPT] * 4), record_attention=True), micro)
    assert len(frames[0].tokens) == 30  # 32 less the start and end markers
    # 36 words and the two markers: the first 30 words are read, the fourth caption is cut after "circle"
    assert [n for n in final.notes if n.startswith("prompt:")] == [
        "prompt: 38 tokens, CLIP reads 32; cut off: “on the left , blue background”"]


def test_a_stopped_run_gives_the_tensors_of_the_steps_it_made(micro, tmp_path):
    from types import SimpleNamespace

    from ui.events import API_OUTPUTS as OUT
    from ui.events import Runner
    from ui.inspect import Inspector
    from ui.stream import RunStore

    def stop_after_three(req, token):
        for item in generate(req, micro, token):
            yield item
            if isinstance(item, Frame) and item.step == 3:
                token.cancel()

    store = RunStore(tmp_path)
    handler = Runner(stop_after_three, store, micro.checkpoint("bundled").limits(), "micro").handler("txt2img")
    *_, last = handler(SimpleNamespace(session_hash="s"), prompt=PROMPT, seed=1, steps=12, width=128, height=128,
                       scheduler="DDIM", record_attention=True)
    assert last[OUT["info"]].startswith("Stopped at step 3/12")
    with safe_open(last[OUT["tensors"]], framework="pt") as f:
        assert f.get_slice("latents").get_shape()[0] == 4 and f.get_slice("attention").get_shape()[:2] == [3, 9]
    views = store.views(last[-1])
    assert Inspector(None).tensors_file(views, views[0].id) == last[OUT["tensors"]]


def test_download_tensors_of_a_running_run_says_to_wait(tmp_path):
    import gradio as gr

    from ui.inspect import Inspector
    from ui.stream import RunStore

    view = RunStore(tmp_path).new_run(micro_request("txt2img", None))
    with pytest.raises(gr.Error, match="no tensors file yet: it is still running"):
        Inspector(None).tensors_file([view], view.id)
    view.ended = True
    with pytest.raises(gr.Error, match="were not saved: the disk refused them"):
        Inspector(None).tensors_file([view], view.id)


def test_token_chips_hand_over_a_token_of_the_run_shown_before():
    from ui.fields import TokenChips

    assert TokenChips(choices=[]).preprocess(3) == 3  # gr.Radio would refuse it: not in the (new) choices
