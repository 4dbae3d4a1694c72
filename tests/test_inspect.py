"""The Inspect panel's data: timeline frames, tokens, starting noise, exports, PNG settings."""

from dataclasses import replace
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from imageio_ffmpeg import read_frames
from PIL import Image

from pipelines import Frame, GenerationError, Limits, generate, validate_request
from pipelines.anatomy import Anatomy
from pipelines.export import export
from pipelines.metadata import a1111_parameters, read_parameters, save_png
from ui.events import Runner
from ui.inspect import Inspector, _pick, run_choices
from ui.stream import RunStore, RunView

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
    got = read_parameters(Image.open(recorded.final))
    r = recorded.request
    assert got == {"prompt": r.prompt, "negative_prompt": "", "steps": 7, "guidance_scale": r.guidance_scale,
                   "seed": r.seed, "scheduler": "DDIM", "model": "tiny", "width": 64, "height": 64}
    img2img = make_request("img2img", negative_prompt="blurry, dark", strength=0.4, scheduler="DPM++ 2M Karras")
    text = a1111_parameters(img2img, "org/model, v2")
    back = read_parameters(text)
    assert back["negative_prompt"] == "blurry, dark" and back["strength"] == 0.4 and back["model"] == "org/model, v2"
    assert back["scheduler"] == "DPM++ 2M Karras"


def test_load_png_fills_the_controls(recorded):
    values = Inspector.load_png(recorded.final)
    r = recorded.request
    assert values == [r.prompt, "", r.seed, 7, r.guidance_scale, 64, 64, "DDIM"]


# -- runs by id, within bounds (issue 16: items 11 and 13) ----------------------

@pytest.fixture(scope="module")
def frames(cache, tiny_dir):
    """A 3-step run's frames, replayed into every run of the store tests."""
    req = validate_request({"mode": "txt2img", "prompt": "a red square", "seed": 5, "steps": 3, "width": 64,
                            "height": 64, "scheduler": "DDIM", "preview": "full-vae"})
    return req, [o for o in generate(req, cache, source=str(tiny_dir)) if isinstance(o, Frame)]


def fill(store, frames, session="s", seed=5):
    req, items = frames
    view = store.new_run(replace(req, seed=seed), session)
    for frame in items:
        store.add_frame(view, frame)
    return view


def test_a_runs_bytes_are_its_arrays_each_counted_once(frames, tmp_path):
    view = fill(RunStore(tmp_path), frames)
    _, items = frames
    arrays = sum(f.pixels.tensor().nbytes + f.latents.tensor().nbytes + f.x0.tensor().nbytes for f in items)
    arrays += sum(f.t.tensor().nbytes for f in items) + items[0].schedule_t.tensor().nbytes
    images = 3 * 64 * 64 * 3  # each frame's PIL image, RGB
    schedule = items[0].alphas_cumprod.nbytes  # shared by the run's frames: once
    assert view.nbytes == arrays + images + schedule
    assert items[0].latents.tensor().shape == (1, 4, 32, 32)  # the tiny model's latents, float32: 16 KiB a step
    assert view.disk_bytes == sum(p.stat().st_size for p in tmp_path.rglob("*.jpg"))


def test_memory_drops_the_least_recently_used_runs_frames_first(frames, tmp_path):
    store = RunStore(tmp_path, keep=8, memory_runs=3)
    runs = [fill(store, frames, seed=n) for n in range(4)]
    assert [bool(v.dropped) for v in runs] == [True, False, False, False] and runs[0].frames == []
    assert "dropped from memory" in runs[0].dropped and "3 most recently used runs" in runs[0].dropped
    store.views([runs[1].id])  # the timeline looked at run 1: now run 2 is the least recently used
    fill(store, frames, seed=4)
    assert [bool(v.dropped) for v in runs] == [True, False, True, False]
    usage = store.usage()
    assert usage["memory_runs"] == 3 and usage["memory_bytes"] == 3 * runs[3].nbytes and usage["disk_runs"] == 5
    assert store.views([v.id for v in runs]) == runs  # dropped from memory, still on disk


def test_memory_is_bounded_by_bytes_in_all_and_per_session(frames, tmp_path):
    one = fill(RunStore(tmp_path / "probe"), frames).nbytes
    store = RunStore(tmp_path / "runs", memory_bytes=int(4.5 * one), session_bytes=int(2.5 * one))
    a = [fill(store, frames, "a", seed=n) for n in range(3)]
    assert [bool(v.dropped) for v in a] == [True, False, False]  # a's share: 2 runs
    b = [fill(store, frames, "b", seed=n) for n in range(2)]
    assert not any(v.dropped for v in b) and store.usage()["memory_bytes"] == 4 * one
    fill(store, frames, "c", seed=9)  # 5 runs would pass 4.5: the least recently used (a's) goes
    assert [bool(v.dropped) for v in a] == [True, True, False] and store.usage()["memory_bytes"] == 4 * one


def test_a_run_larger_than_its_sessions_share_keeps_no_frames(frames, tmp_path):
    store = RunStore(tmp_path, session_bytes=1000)
    view = fill(store, frames)
    assert view.dropped and view.frames == [] and view.nbytes == 0 and store.usage()["memory_bytes"] == 0
    assert len(view.gallery) == 3 and view.step == 3  # still shown while it ran


def test_disk_keeps_the_newest_folders_and_forgets_their_runs(frames, tmp_path):
    store = RunStore(tmp_path, keep=3)
    runs = [fill(store, frames, seed=n) for n in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [v.id for v in runs[2:]]
    assert store.views([v.id for v in runs]) == runs[2:] and runs[0].dropped
    store.forget([runs[3].id])
    assert not runs[3].folder.exists() and store.views([v.id for v in runs]) == [runs[2], runs[4]]
    assert store.usage() == {"memory_runs": 2, "memory_bytes": 2 * runs[4].nbytes, "disk_runs": 2,
                             "disk_bytes": runs[2].disk_bytes + runs[4].disk_bytes}


def test_disk_is_bounded_by_bytes(frames, tmp_path):
    one = fill(RunStore(tmp_path / "probe"), frames).disk_bytes
    store = RunStore(tmp_path / "runs", disk_bytes=int(2.5 * one))
    runs = [fill(store, frames, seed=n) for n in range(4)]
    # the bound is checked as a run starts: the new one and the newest within 2.5 runs stay
    assert store.views([v.id for v in runs]) == runs[1:]


def runner_session(store, cache, tiny_dir, fail_seed):
    """A session as Gradio drives it: the State of run ids goes in, the last update's comes out."""

    def run(req, token):
        if req.seed == fail_seed:
            raise GenerationError("the UNet ran out of memory")
        return generate(req, cache, token, source=str(tiny_dir))

    handler = Runner(run, store, Limits(), "tiny").handler("txt2img")
    state = {"runs": []}

    def go(seed):
        fields = {"prompt": "a red square", "seed": seed, "steps": 2, "width": 64, "height": 64, "scheduler": "DDIM"}
        try:
            *_, last = handler(SimpleNamespace(session_hash="s"), runs=state["runs"], **fields)
        except gr.Error:
            return False
        state["runs"] = last[5]
        return True

    return go, state


def test_compare_keeps_its_run_through_new_and_failed_runs(cache, tiny_dir, inspector, tmp_path):
    store = RunStore(tmp_path)
    go, state = runner_session(store, cache, tiny_dir, fail_seed=13)

    def refresh(other):
        views = store.views(state["runs"])
        pick, compare, _ = inspector.refresh(views, other)
        assert [tuple(c) for c in compare.choices] == [(v.label, v.id) for v in views]
        return pick.value, compare.value

    assert go(1) and go(2)
    assert refresh(None) == (state["runs"][1], None)
    other = state["runs"][0]  # the user compares with the seed-1 run
    for seed in (3, 13, 4):  # a new run, a failed one, another new one: 4 runs kept, nothing dropped
        assert go(seed) is (seed != 13)
        newest, other = refresh(other)
        assert _pick(store.views(state["runs"]), other).request.seed == 1
        assert _pick(store.views(state["runs"]), newest).request.seed == (3 if seed == 13 else seed)
    assert [v.request.seed for v in store.views(state["runs"])] == [1, 2, 3, 4]
    assert go(5)  # the seed-1 run leaves the session's 4: the choice is cleared, not moved
    newest, other = refresh(other)
    assert other is None and _pick(store.views(state["runs"]), newest).request.seed == 5
    assert len(store.views(state["runs"])) == 4 and store.usage()["memory_runs"] == 4  # the failed run left nothing


def test_timeline_and_export_say_when_a_runs_steps_were_dropped(frames, inspector, tmp_path):
    store = RunStore(tmp_path, memory_runs=1)
    old, new = fill(store, frames, seed=1), fill(store, frames, seed=2)
    runs = store.views([old.id, new.id])
    *_, info, channels, plot = inspector.timeline(runs, old.id, None, 2)
    assert info == old.dropped and "dropped from memory" in info and channels == [] and plot == ""
    assert inspector.timeline(runs, new.id, old.id, 2)[3].startswith("**step 2/3**")
    assert inspector.timeline(runs, new.id, old.id, 2)[2] is None  # nothing to put beside it
    with pytest.raises(gr.Error, match="dropped from memory"):
        inspector.export_run(runs, old.id, "gif")
    assert "steps dropped" in run_choices(runs)[0][0] and run_choices(runs)[1][1] == new.id
