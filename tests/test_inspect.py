"""The Inspect panel's data: timeline frames, tokens, starting noise, exports, PNG settings."""

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from imageio_ffmpeg import read_frames
from PIL import Image, PngImagePlugin

from pipelines import Frame, generate
from pipelines.anatomy import Anatomy
from pipelines.export import export
from pipelines.metadata import a1111_parameters, read_parameters, save_png
from ui.inspect import Inspector
from ui.stream import RunView

from .conftest import pixels


@pytest.fixture
def recorded(cache, tiny_dir, make_request, tmp_path):
    """A finished run as the UI keeps it."""
    req = make_request(steps=7, preview="full-vae", view="x_t", scheduler="DDIM")
    view = RunView(tmp_path, request=req)
    for item in generate(req, cache, source=str(tiny_dir)):
        if isinstance(item, Frame):
            view.add_frame(item)
        else:
            view.final = save_png(item, tmp_path / "final.png", "tiny")
    return view


@pytest.fixture
def inspector(cache, tiny_dir):
    return Inspector(Anatomy(cache, str(tiny_dir)))


def test_timeline_returns_the_exact_stored_frame_for_every_step(recorded, inspector):
    for step in range(1, 8):
        x_t, x0, _, info, channels, plot = inspector.show([recorded], 0, None, step)
        assert np.array_equal(pixels(x_t), pixels(recorded.frames[step - 1].image))  # x_t preview, re-decoded
        assert f"step {step}/7" in info and "noise level" in info and "<svg" in plot
        assert len(channels) == 4 and channels[0][0].mode == "L"
        assert not np.array_equal(pixels(x_t), pixels(x0))


def test_x0_view_in_the_timeline_matches_an_x0_run(cache, tiny_dir, make_request, recorded, inspector):
    x0_run = [o for o in generate(make_request(steps=7, preview="full-vae", view="x0", scheduler="DDIM"), cache,
                                  source=str(tiny_dir)) if isinstance(o, Frame)]
    for step in (1, 4, 7):
        _, x0, *_ = inspector.show([recorded], 0, None, step)
        assert np.array_equal(pixels(x0), pixels(x0_run[step - 1].image))


def test_noise_levels_fall_to_the_end(recorded):
    levels = recorded.levels
    assert len(levels) == 7 and levels == sorted(levels, reverse=True) and 0 < levels[-1] < levels[0] <= 1
    assert [round(f.noise_level, 6) for f in recorded.frames] == [round(v, 6) for v in levels]


def test_compare_shows_the_other_run_at_the_same_step(recorded, inspector, cache, tiny_dir, make_request, tmp_path):
    other = RunView(tmp_path / "b", request=make_request(seed=99, steps=7, preview="full-vae"))
    (tmp_path / "b").mkdir()
    for item in generate(other.request, cache, source=str(tiny_dir)):
        if isinstance(item, Frame):
            other.add_frame(item)
    _, _, beside, *_ = inspector.show([recorded, other], 0, 1, 3)
    _, own_x0, *_ = inspector.show([recorded, other], 1, None, 3)
    assert np.array_equal(pixels(beside), pixels(own_x0))


def test_step_zero_is_the_seeds_starting_noise(recorded, inspector, cache, tiny_dir):
    image, *_ = inspector.show([recorded], 0, None, 0)
    pipe = cache.pipeline("txt2img", str(tiny_dir))
    noise = randn_tensor((1, 4, 32, 32), generator=torch.Generator().manual_seed(recorded.request.seed))
    expected = cache.checkpoint(str(tiny_dir)).latent_rgb(noise)
    assert np.array_equal(pixels(image), expected.numpy()) and pipe.vae_scale_factor == 2


def test_tokens_view_matches_the_tokenizer(inspector, cache, tiny_dir):
    tokenizer = cache.pipeline("txt2img", str(tiny_dir)).tokenizer
    prompt = "a red circle " * 10  # 130 characters: one token each with this tokenizer
    tokens = inspector.anatomy.tokens(prompt)
    assert [t.id for t in tokens] == tokenizer(prompt, truncation=False).input_ids
    kept = [t.id for t in tokens if t.kept]
    assert kept == tokenizer(prompt, truncation=True, max_length=77).input_ids
    html = inspector.tokens(prompt)
    assert f"{len(tokens)} tokens" in html and f"{len(tokens) - 77} cut off" in html


@pytest.mark.parametrize("kind", ["gif", "webp", "mp4"])
def test_animations_have_one_frame_per_step_for_an_independent_reader(recorded, inspector, kind):
    path = inspector.export([recorded], 0, kind)
    reader = read_frames(path)  # ffmpeg's own decoders, not Pillow or PyAV
    meta = next(reader)
    decoded = list(reader)
    assert len(decoded) == 7 and meta["size"][0] >= 64


def test_zip_holds_every_step_as_lossless_png(recorded, inspector):
    import zipfile

    with zipfile.ZipFile(inspector.export([recorded], 0, "zip")) as archive:
        names = archive.namelist()
        assert names == [f"step_{n:04d}.png" for n in range(1, 8)]
        with archive.open(names[2]) as f:
            assert np.array_equal(pixels(Image.open(f)), pixels(recorded.frames[2].image))


def test_export_refuses_unknown_formats_and_empty_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'avi'"):
        export([Image.new("RGB", (8, 8))], tmp_path / "x.avi")
    with pytest.raises(ValueError, match="nothing to export"):
        export([], tmp_path / "x.gif")


def test_export_says_what_went_wrong(recorded, inspector, tmp_path):
    with pytest.raises(gr.Error, match="^'Nothing to export yet: run a generation first, then download its steps.'$"):
        inspector.export([], None, "gif")
    gone = RunView(tmp_path / "deleted-run", request=recorded.request)
    gone.frames = recorded.frames
    with pytest.raises(gr.Error, match="This run's files are gone .*: run it again to download its steps"):
        inspector.export([gone], 0, "gif")
    assert inspector.export([recorded], None, "gif").endswith("steps.gif")  # no pick yet: the newest run


def test_png_metadata_is_read_by_sd_parsers(recorded):
    from sd_parsers import ParserManager

    info = ParserManager().parse(Image.open(recorded.final))
    r = recorded.request
    assert info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DDIM" and sampler.model.name == "tiny"
    assert sampler.parameters == {"cfg_scale": str(r.guidance_scale), "seed": str(r.seed), "steps": "7"}
    assert [p.value for p in sampler.prompts] == [r.prompt]
    assert info.metadata["Size"] == "64x64"


def test_png_round_trips_into_the_same_settings(recorded, make_request, tmp_path):
    got = read_parameters(recorded.final)
    r = recorded.request
    assert (got.generator, got.model) == ("AUTOMATIC1111", "tiny")
    assert got.fields == {"prompt": r.prompt, "steps": 7, "guidance_scale": r.guidance_scale, "seed": r.seed,
                          "scheduler": "DDIM", "width": 64, "height": 64}
    assert got.notes == ("the file has no negative prompt: kept yours",)
    img2img = make_request("img2img", negative_prompt="blurry, dark", strength=0.4, scheduler="DPM++ 2M Karras")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(img2img, "org/model-v2"))
    Image.new("RGB", (8, 8)).save(tmp_path / "img2img.png", pnginfo=info)
    back = read_parameters(tmp_path / "img2img.png")
    assert back.fields == {"prompt": "a red square", "negative_prompt": "blurry, dark", "seed": 3, "steps": 6,
                           "guidance_scale": 5.0, "width": 64, "height": 64, "scheduler": "DPM++ 2M Karras",
                           "strength": 0.4}
    assert back.model == "org/model-v2" and back.notes == ()


def test_load_png_fills_the_controls(recorded):
    *values, note = Inspector(None).load_png(recorded.final)
    r = recorded.request
    skip = gr.skip()
    assert values == [r.prompt, skip, r.seed, 7, r.guidance_scale, 64, 64, "DDIM", skip, skip]
    assert note == (f"**Loaded from AUTOMATIC1111 (made with model tiny): prompt, seed {r.seed}, steps 7, "
                    f"CFG {r.guidance_scale}, size 64x64, scheduler DDIM.**"
                    "\n- the file has no negative prompt: kept yours")
