"""The Inspect panel's data: timeline frames, tokens, starting latents, exports, PNG settings."""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from imageio_ffmpeg import read_frames
from PIL import Image, PngImagePlugin

from pipelines import Frame, GenerationError, Limits, ModelCache, generate, validate_request
from pipelines.anatomy import Anatomy
from pipelines.export import export
from pipelines.metadata import a1111_parameters, read_parameters, save_png
from pipelines.schedulers import make_scheduler
from pipelines.tiny import save_tiny_checkpoint
from ui.events import Runner, RunUpdate
from ui.inspect import Inspector, _pick, run_choices
from ui.stream import RunStore, RunView, schedule_svg

from .conftest import pixels


@pytest.fixture
def recorded(cache, tiny_dir, make_request, tmp_path):
    """A finished run as the UI keeps it."""
    return record(make_request(steps=7, preview="full-vae", view="x_t", scheduler="DDIM"), cache, tiny_dir, tmp_path)


@pytest.fixture
def inspector(tiny_dir):
    return Inspector(Anatomy(str(tiny_dir)))


def record(req, cache, source, folder) -> RunView:
    folder.mkdir(exist_ok=True)
    view = RunView(folder, request=req)
    for item in generate(req, cache, source=str(source)):
        if isinstance(item, Frame):
            view.add_frame(item)
        else:
            view.final = save_png(item, folder / "final.png", "tiny")
    return view


@pytest.mark.parametrize("scheduler", ["Euler", "Euler a", "DDIM", "DPM++ 2M Karras"])
def test_timeline_shows_the_pixels_the_run_streamed_for_both_views(cache, tiny_dir, make_request, inspector,
                                                                     tmp_path, scheduler):
    """Same seed, two runs: one streams x_t, one x0. The timeline of each shows, at every
    step, the very pixels the other streamed live, and the last x_t is the final image."""
    runs = [record(make_request(steps=7, preview="full-vae", view=view, scheduler=scheduler), cache, tiny_dir,
                   tmp_path / view) for view in ("x_t", "x0")]
    decode = cache.checkpoint(str(tiny_dir)).decoder("full-vae")
    for n in range(2):
        for step in range(1, 8):
            x_t, x0, _, info, channels, plot = inspector.show(runs, n, None, step)
            assert np.array_equal(pixels(x_t), pixels(runs[0].frames[step - 1].image))
            assert np.array_equal(pixels(x0), pixels(runs[1].frames[step - 1].image))
            frame = runs[n].frames[step - 1]
            assert np.array_equal(pixels(x_t), decode(frame.latents.tensor()).numpy())  # made from the kept latents
            assert f"step {step}/7" in info and f"noise level √(1−ᾱ)={frame.noise_level:.3f}" in info
            assert len(channels) == 4 and channels[0][0].mode == "L" and "<svg" in plot
        last = pixels(inspector.show(runs, n, None, 7)[0]).astype(int)
        assert np.abs(last - pixels(Image.open(runs[n].final)).astype(int)).max() <= 1  # x_t after the last step


def test_noise_levels_are_the_schedulers_own(cache, tiny_dir, make_request, tmp_path):
    """levels[0]: the start; levels[k]: x_t after step k, the next timestep's level, and
    after the last step DDIM's final_alpha_cumprod (alphas_cumprod[0] here) or Euler's sigma 0."""
    ddim = record(make_request(steps=7, scheduler="DDIM"), cache, tiny_dir, tmp_path / "ddim")
    alphas_cumprod = cache.pipeline("txt2img", str(tiny_dir)).scheduler.alphas_cumprod
    timesteps = [int(f.timestep) for f in ddim.frames]
    expected = [float((1 - alphas_cumprod[t]) ** 0.5) for t in [*timesteps, 0]]
    assert ddim.levels == pytest.approx(expected, abs=1e-6) and len(ddim.levels) == 8
    assert [f.noise_level for f in ddim.frames] == ddim.levels[1:]
    euler = record(make_request(steps=7, scheduler="Euler"), cache, tiny_dir, tmp_path / "euler")
    sigmas = make_scheduler("Euler", cache.pipeline("txt2img", str(tiny_dir)).scheduler.config)
    sigmas.set_timesteps(7)
    assert euler.levels == pytest.approx([float(s / (s**2 + 1) ** 0.5) for s in sigmas.sigmas], abs=1e-6)
    assert euler.levels[-1] == 0 and euler.frames[-1].sigma == 0
    assert [round(f.sigma, 4) for f in euler.frames] == [round(float(s), 4) for s in sigmas.sigmas[1:]]
    # the plot: step 0 (the start) at the left edge, step 7 at the right, marked where the slider is
    assert '<circle cx="28.0"' in schedule_svg(euler.levels, 0)
    assert '<circle cx="452.0"' in schedule_svg(euler.levels, 7)


def test_compare_shows_the_other_run_at_the_same_step(recorded, inspector, cache, tiny_dir, make_request, tmp_path):
    other = record(make_request(seed=99, steps=7, preview="full-vae"), cache, tiny_dir, tmp_path / "b")
    _, _, beside, *_ = inspector.show([recorded, other], 0, 1, 3)
    _, own_x0, *_ = inspector.show([recorded, other], 1, None, 3)
    assert np.array_equal(pixels(beside), pixels(own_x0))
    assert inspector.show([recorded, other], 0, 1, 0)[2] is None  # step 0: no x0 yet, in either run
    short = record(make_request(seed=5, steps=3, preview="full-vae"), cache, tiny_dir, tmp_path / "c")
    _, _, beside, info, *_ = inspector.show([recorded, short], 0, 1, 6)
    assert np.array_equal(pixels(beside), pixels(short.frames[2].x0_pixels.pil()))
    assert "compared run at step 3/3" in info


def test_step_zero_is_the_seeds_noise_for_txt2img(recorded, inspector, cache, tiny_dir, make_request, tmp_path):
    noise = randn_tensor((1, 4, 32, 32), generator=torch.Generator().manual_seed(recorded.request.seed))
    # DDIM starts from the noise itself (the recorded run decodes it with the full VAE)
    image, x0, _, info, channels, _ = inspector.show([recorded], 0, None, 0)
    full_vae = cache.checkpoint(str(tiny_dir)).decoder("full-vae")
    assert np.array_equal(pixels(image), full_vae(noise).numpy()) and x0 is None
    assert "step 0" in info and "the seed's starting noise" in info and "noise level √(1−ᾱ)=" in info
    assert len(channels) == 4
    assert torch.equal(recorded.frames[0].start_latents.tensor(), noise)
    # Euler starts from noise * init_noise_sigma; shown like every x_t, divided by sqrt(sigma^2 + 1)
    euler = record(make_request(seed=recorded.request.seed, steps=7, scheduler="Euler"), cache, tiny_dir,
                   tmp_path / "euler")
    assert torch.allclose(euler.frames[0].start_latents.tensor(), noise, atol=1e-5)
    image, *_ = inspector.show([euler], 0, None, 0)
    assert np.array_equal(pixels(image), cache.checkpoint(str(tiny_dir)).latent_rgb(
        euler.frames[0].start_latents.tensor()).numpy())


@pytest.fixture(scope="module")
def micro():
    """The bundled micro model: a trained VAE, so a picture of latents can resemble an image."""
    from pipelines.cache import BUNDLED_FOLDER

    return str(BUNDLED_FOLDER)


@pytest.mark.parametrize("mode", ["img2img", "depth2img"])
@pytest.mark.parametrize("scheduler", ["DDIM", "Euler"])
def test_step_zero_is_the_noised_input_image(cache, micro, make_request, scene, tmp_path, mode, scheduler):
    """At strength 0.1 a run starts from the input image's latents with a little noise
    (noise level 0.335 on the micro model's schedule): step 0 shows that, not the seed's noise."""
    big = scene.resize((128, 128), Image.NEAREST)  # the micro model's native size
    kw = dict(steps=20, preview="full-vae", scheduler=scheduler, width=128, height=128)
    view = record(make_request(mode, strength=0.1, image=big, **kw), cache, micro, tmp_path / mode)
    inspector = Inspector(Anatomy(micro))
    start, x0, _, info, *_ = inspector.show([view], 0, None, 0)
    noise, *_ = inspector.show([record(make_request(**kw), cache, micro, tmp_path / "txt2img")], 0, None, 0)
    error = np.abs(pixels(start).astype(float) - pixels(big)).mean()
    assert error < 30 and np.abs(pixels(noise).astype(float) - pixels(big)).mean() > 60
    assert x0 is None and "input image's latents, noised to strength 0.1" in info
    assert len(view.frames) == 2 and view.levels[0] == pytest.approx(0.335, abs=1e-3)


def test_scrubbing_touches_no_model_during_and_after_a_run(cache, tiny_dir, make_request, inspector, tmp_path,
                                                           monkeypatch):
    """The panel's events run outside the queue: they must not load, evict or run a model."""
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the Inspect panel called ModelCache.{name}")
        return call

    req = make_request(steps=6, preview="full-vae", scheduler="Euler")
    view, other = RunView(tmp_path, request=req), record(make_request(seed=8), cache, tiny_dir, tmp_path / "o")
    inspector.tokens("a red square")  # the tokenizers load once, on first use (no weights)
    for item in generate(req, cache, source=str(tiny_dir)):
        if isinstance(item, Frame):
            view.add_frame(item)
            with monkeypatch.context() as m:
                for name in ("checkpoint", "pipeline", "_load", "_derive", "_evict", "free_memory"):
                    m.setattr(ModelCache, name, refuse(name))
                for step in range(item.step + 1):
                    assert inspector.show([view, other], 0, 1, step)[0] is not None
                inspector.tokens("a red square")
    with monkeypatch.context() as m:
        for name in ("checkpoint", "pipeline", "_load", "_derive", "_evict", "free_memory"):
            m.setattr(ModelCache, name, refuse(name))
        for step in range(7):
            inspector.show([view, other], 0, 1, step)
            inspector.show([view, other], 1, 0, step)
    assert calls == []


@pytest.fixture(scope="module")
def second_source(tmp_path_factory):
    """Another checkpoint (other weights) whose tokenizer reads 16 tokens, like a --depth-model would be."""
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("second") / "ckpt", seed=4)
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 16}))
    return folder


def test_a_depth_run_from_another_source_is_shown_and_tokenized_with_that_source(
        cache, tiny_dir, second_source, make_request, tmp_path):
    inspector = Inspector(Anatomy(str(tiny_dir), depth_model=str(second_source)))
    view = record(make_request("depth2img", steps=5, strength=1.0, preview="full-vae", scheduler="DDIM"), cache,
                  second_source, tmp_path / "depth")
    x_t, *_ = inspector.show([view], 0, None, 5)
    final = pixels(Image.open(view.final)).astype(int)
    assert np.abs(pixels(x_t).astype(int) - final).max() <= 1  # the depth source's VAE made it
    with_model_vae = cache.checkpoint(str(tiny_dir)).decoder("full-vae")(view.frames[-1].latents.tensor())
    assert np.abs(with_model_vae.numpy().astype(int) - final).mean() > 10
    prompt = "a red circle " * 2  # one token per letter here: 20, and the two markers
    html = inspector.tokens(prompt)
    assert html.count("sw-tokens") == 2
    assert f"depth2img ({second_source}) · CLIP (tokenizer): 22 tokens · <b>6 cut off</b> (the encoder reads 16)" in html
    assert f"txt2img and img2img ({tiny_dir}) · CLIP (tokenizer): 22 tokens (reads 77)<" in html
    [encoded] = inspector.anatomy.tokens(prompt, str(second_source))
    assert [t.id for t in encoded.tokens if t.kept] == \
        cache.pipeline("depth2img", str(second_source)).tokenizer(prompt, truncation=True).input_ids


def test_tokens_say_when_a_source_cannot_be_read(tmp_path):
    html = Inspector(Anatomy(str(tmp_path / "missing" / "model"))).tokens("a red square")
    assert "no tokens" in html and "neither a local folder nor a hub repo id" in html


def test_pndm_second_evaluation_of_a_timestep_is_said(cache, tiny_dir, make_request, inspector, tmp_path):
    view = record(make_request(steps=4, scheduler="PNDM"), cache, tiny_dir, tmp_path / "pndm")
    assert len(view.frames) == 5 and view.frames[0].timestep != view.frames[1].timestep == view.frames[2].timestep
    assert view.levels[1] == view.levels[2]  # both leave x_t at the second timestep
    info = inspector.show([view], 0, None, 3)[3]
    assert "step 3/5" in info and "same timestep as step 2: this scheduler evaluates it a second time" in info
    assert "same timestep" not in inspector.show([view], 0, None, 2)[3]


def test_tokens_view_matches_the_tokenizer(inspector, cache, tiny_dir):
    tokenizer = cache.pipeline("txt2img", str(tiny_dir)).tokenizer
    prompt = "a red circle " * 10  # one token per letter with this tokenizer: 100, and the two markers
    [encoded] = inspector.anatomy.tokens(prompt)
    tokens = encoded.tokens
    assert encoded.encoder == "CLIP (tokenizer)" and encoded.limit == 77
    assert [t.id for t in tokens] == tokenizer(prompt, truncation=False).input_ids
    kept = [t.id for t in tokens if t.kept]
    assert kept == tokenizer(prompt, truncation=True, max_length=77).input_ids
    html = inspector.tokens(prompt)
    assert f"{len(tokens)} tokens" in html and f"{len(tokens) - 77} cut off" in html and html.count("sw-tokens") == 1


@pytest.mark.parametrize("kind", ["gif", "webp", "mp4"])
def test_animations_have_one_frame_per_step_for_an_independent_reader(recorded, inspector, kind):
    path = inspector.export([recorded], 0, kind)
    reader = read_frames(path)  # ffmpeg's own decoders, not Pillow or PyAV
    meta = next(reader)
    decoded = list(reader)
    assert len(decoded) == 7 and meta["size"][0] >= 256  # small frames scaled up as the page shows them
    req = recorded.request
    assert Path(path).name == f"{req.mode}-seed{req.seed}-{recorded.folder.name[-8:]}.{kind}"


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
    newest = f"-seed{recorded.request.seed}-{recorded.folder.name[-8:]}.gif"
    assert inspector.export([recorded], None, "gif").endswith(newest)  # no pick yet: the newest run


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
    values, note = Inspector(None).load_png(recorded.final)
    r = recorded.request
    assert values == {"prompt": r.prompt, "seed": r.seed, "steps": 7, "guidance_scale": r.guidance_scale,
                      "width": 64, "height": 64, "scheduler": "DDIM"}
    assert note == (f"**Loaded from AUTOMATIC1111 (made with model tiny): prompt, seed {r.seed}, steps 7, "
                    f"CFG {r.guidance_scale}, size 64x64, scheduler DDIM.**"
                    "\n- the file has no negative prompt: kept yours")


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
    kept = ("t", "xt_pixels", "x0_pixels", "latents", "x0", "noise_pred", "noise_pred_text", "noise_pred_uncond")
    arrays = sum(getattr(f, name).tensor().nbytes for f in items for name in kept)  # the guidance pair: CFG 7.5
    arrays += items[0].start_pixels.tensor().nbytes + items[0].start_latents.tensor().nbytes  # the run's start
    images = 3 * 64 * 64 * 4  # each frame's cached PIL image: RGB held as 4 bytes a pixel
    assert view.nbytes == arrays + images
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
        state["runs"] = last[RunUpdate._fields.index("runs")]
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
    assert inspector.inside(runs, old.id, 2) == ("", [], "", [], "", "", [], None, None, [])  # nothing inside either
    assert inspector.timeline(runs, new.id, old.id, 2)[3].startswith("**step 2/3**")
    assert inspector.timeline(runs, new.id, old.id, 2)[2] is None  # nothing to put beside it
    with pytest.raises(gr.Error, match="dropped from memory"):
        inspector.export_run(runs, old.id, "gif")
    assert "steps dropped" in run_choices(runs)[0][0] and run_choices(runs)[1][1] == new.id


@pytest.mark.parametrize("family, readings", [
    ("sd3", [("CLIP (tokenizer, tokenizer_2)", 77), ("T5 (tokenizer_3)", 256)]),
    ("flux", [("CLIP (tokenizer)", 77), ("T5 (tokenizer_2)", 512)]),
])
def test_tokens_of_each_text_encoder_with_its_own_limit(cache, tiny_families, family, readings):
    """Each encoder's tokens and what it cuts off, as the pipeline encodes the prompt: CLIP at
    77, T5 at max_sequence_length (256 for SD 3, 512 for Flux)."""
    source = str(tiny_families(family))
    prompt = "a red square " * 30  # one token per letter: 300 in CLIP, 390 in the tiny T5
    encoded = Anatomy(source).tokens(prompt)
    assert [(e.encoder, e.limit) for e in encoded] == readings
    pipe = cache.pipeline("txt2img", source)
    for e in encoded:
        tokenizer = getattr(pipe, e.encoder.split("(")[1].split(",")[0].rstrip(")"))
        assert [t.id for t in e.tokens] == tokenizer(prompt, truncation=False).input_ids
        assert [t.id for t in e.tokens if t.kept] == tokenizer(prompt, truncation=True, max_length=e.limit).input_ids
        assert e.cut == max(len(e.tokens) - e.limit, 0)
    html = Inspector(Anatomy(source)).tokens(prompt)
    assert html.count("sw-tokens") == 2
    for e in encoded:
        said = f"<b>{e.cut} cut off</b> (the encoder reads {e.limit})" if e.cut else f"(reads {e.limit})"
        assert f"{e.encoder}: {len(e.tokens)} tokens{' · ' if e.cut else ' '}{said}" in html
    assert [e.cut for e in encoded] == ([225, 135] if family == "sd3" else [225, 0])


def test_flow_matching_runs_show_sigma_and_sixteen_channels(cache, tiny_families, make_request, tmp_path):
    """Flux: x_t = (1 - sigma) x0 + sigma noise, so the noise level is sigma, said as such (not
    sqrt(1 - alpha_bar)); its latents have 16 channels, the gallery says so."""
    source = tiny_families("flux")
    view = record(make_request(steps=3, negative_prompt=""), cache, source, tmp_path / "flux")
    inspector = Inspector(Anatomy(str(source)))
    for step in range(4):
        _, _, _, info, channels, plot = inspector.show([view], 0, None, step)
        level = view.frames[0].schedule.levels[step]
        assert f"noise level σ={level:.3f}" in info and "√(1−ᾱ)" not in info
        assert len(channels) == 16 and "noise level σ<" in plot
    gallery = inspector.timeline([view], None, None, 3)[4]
    assert gallery.label == "The 16 latent channels of x_t"
    assert view.levels[0] == pytest.approx(1.0) and view.levels[-1] == 0.0  # pure noise to clean, in sigma
    sd = record(make_request(steps=3), cache, tiny_families("sd"), tmp_path / "sd")
    assert inspector.timeline([sd], None, None, 3)[4].label == "The 4 latent channels of x_t"
    assert "noise level √(1−ᾱ)=" in inspector.show([sd], 0, None, 3)[3]


# -- inside the denoiser (issue 18): the update, the guidance pair, where each word looks --------

@pytest.fixture(scope="module")
def inside_run(cache, tiny_dir, tmp_path_factory):
    """A 5-step run with CFG 5 and recorded attention, pictures by the full VAE (64x64; latents 32x32)."""
    req = validate_request({"mode": "txt2img", "prompt": "a red square", "seed": 3, "steps": 5, "width": 64,
                            "height": 64, "scheduler": "DDIM", "preview": "full-vae", "guidance_scale": 5.0,
                            "record_attention": True})
    return record(req, cache, tiny_dir, tmp_path_factory.mktemp("inside"))


def signed_picture(matrix: torch.Tensor, latents: torch.Tensor) -> tuple[np.ndarray, float]:
    """The picture of a signed latent tensor, computed here in numpy: RGB = latents . matrix (no bias),
    divided by its max |value|, [-1, 1] -> [0, 255]."""
    rgb = np.einsum("chw,cr->hwr", latents[0].float().numpy(), matrix.float().numpy())
    scale = np.abs(rgb).max()
    return np.round((rgb / scale + 1) * 127.5).astype(np.uint8), float(scale)


def test_the_update_shows_x_t_before_noise_pred_what_was_removed_and_x_t_after(inside_run, inspector, cache,
                                                                                 tiny_dir):
    frames, matrix = inside_run.frames, cache.checkpoint(str(tiny_dir)).latent_rgb.matrix
    noise = []
    for step in range(1, 6):
        shown = inspector.inside([inside_run], 0, step)
        (before, before_label), (noise_pred, noise_label), (removed, removed_label), (after, after_label) = shown.update
        frame = frames[step - 1]
        start = frames[step - 2].xt_pixels if step > 1 else frames[0].start_pixels
        assert np.array_equal(pixels(before), start.tensor().numpy()) and before.size == (64, 64)
        assert np.array_equal(pixels(after), frame.xt_pixels.tensor().numpy())
        assert before_label == (f"x_t before (step {step - 1})" if step > 1 else "x_t before (step 0: the start)")
        assert after_label == f"x_{{t-1}} (after step {step})"
        assert noise_pred.size == removed.size == (32, 32)  # latent-sized, shown scaled up
        expected, scale = signed_picture(matrix, frame.noise_pred.tensor())
        assert np.abs(pixels(noise_pred).astype(int) - expected).max() <= 1
        assert noise_label == f"noise_pred (ε) · max |value| {scale:.3g}"
        assert pixels(noise_pred).std() > 20  # not blank
        x_t = (frames[step - 2].latents if step > 1 else frames[0].start_latents).tensor()
        expected, scale = signed_picture(matrix, x_t - frame.latents.tensor())
        assert np.abs(pixels(removed).astype(int) - expected).max() <= 1
        assert removed_label == f"x_t − x_{{t-1}} · max |value| {scale:.3g}" and pixels(removed).std() > 20
        assert f"**The update at step {step}/5**, timestep t={frame.timestep:.0f}" in shown.update_note
        noise.append(pixels(noise_pred))
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(noise, noise[1:]))  # each step its own
    at_start = inspector.inside([inside_run], 0, 0)
    assert at_start.update == [] and at_start.guidance == [] and at_start.grid == [] and at_start.overlay is None
    assert at_start.update_note.startswith("Step 0 is where the run starts")


def test_guidance_shows_both_predictions_their_difference_and_its_size_over_the_run(inside_run, inspector, cache,
                                                                                     tiny_dir):
    matrix = cache.checkpoint(str(tiny_dir)).latent_rgb.matrix
    shown = inspector.inside([inside_run], 0, 2)
    frame = inside_run.frames[1]
    (uncond, uncond_label), (text, text_label), (direction, direction_label) = shown.guidance
    for picture, label, tensor in ((uncond, uncond_label, frame.noise_pred_uncond.tensor()),
                                   (text, text_label, frame.noise_pred_text.tensor())):
        expected, scale = signed_picture(matrix, tensor)
        assert np.abs(pixels(picture).astype(int) - expected).max() <= 1 and label.endswith(f"{scale:.3g}")
    expected, scale = signed_picture(matrix, frame.noise_pred_text.tensor() - frame.noise_pred_uncond.tensor())
    assert np.abs(pixels(direction).astype(int) - expected).max() <= 1 and direction.size == (32, 32)
    assert direction_label == f"text − uncond · max |value| {scale:.3g}"
    assert not np.array_equal(pixels(direction), pixels(text)) and pixels(direction).std() > 20
    # the plot over the run: one point per step for each line, the y axis up to the largest value
    rms = [float(torch.sqrt(((f.noise_pred_text.tensor() - f.noise_pred_uncond.tensor()) ** 2).mean()))
           for f in inside_run.frames]
    assert f"RMS of 5.0·(text − uncond) {5 * rms[1]:.3g}" in shown.guidance_note
    plot = shown.guidance_plot
    assert plot.count("<polyline") == 2 and "5.0·(text − uncond)" in plot and "noise_pred" in plot
    assert all(len(line.split('points="')[1].split('"')[0].split()) == 5 for line in plot.split("<polyline")[1:])
    assert f">{max(5 * max(rms), max(f.noise_pred_rms for f in inside_run.frames)):.2g}<" in plot
    assert plot.count('<circle cx="134.0"') == 2  # step 2 of 5, marked on both lines
    assert '<circle cx="346.0"' in inspector.inside([inside_run], 0, 4).guidance_plot
    assert "<circle" not in inspector.inside([inside_run], 0, 0).guidance_plot  # step 0: the run's start


def test_without_guidance_one_line_says_why(cache, tiny_dir, tiny_families, make_request, inspector, tmp_path):
    off = record(make_request(steps=3, guidance_scale=1.0, preview="full-vae"), cache, tiny_dir, tmp_path / "off")
    shown = inspector.inside([off], 0, 2)
    assert shown.guidance_note == ("CFG was off: guidance_scale 1.0 ≤ 1, so the denoiser made one prediction per "
                                   "step (no uncond/text pair).")
    assert shown.guidance == [] and shown.guidance_plot == "" and len(shown.update) == 4
    flux = record(make_request(steps=3, negative_prompt="", guidance_scale=3.5), cache, tiny_families("flux"),
                  tmp_path / "flux")
    shown = Inspector(Anatomy(str(tiny_families("flux")))).inside([flux], 0, 3)
    assert shown.guidance_note == ("No CFG: this model takes guidance 3.5 as an input (distilled guidance) and makes "
                                   "one prediction per step (no uncond/text pair).")
    assert shown.guidance == [] and shown.guidance_plot == ""
    noise, label = shown.update[1]  # 16 channels through Flux's map
    assert noise.size == (32, 32) and label.startswith("noise_pred (flow velocity) · max |value| ")


def test_each_words_map_over_x0_follows_the_token_and_the_step(inside_run, inspector):
    frame = inside_run.frames[2]
    tokens = frame.tokens
    assert len(tokens) >= 3 and frame.attention.tensor().shape == (len(tokens), 32, 32)
    shown = inspector.inside([inside_run], 0, 3, 1)
    assert shown.tokens == [(f"{k} · {word}", k - 1) for k, word in enumerate(tokens, 1)] and shown.token == 1
    overlay, caption = shown.overlay
    heat = frame.attention.tensor()[1].float()
    assert overlay.size == (64, 64)  # the x0 picture's size
    assert caption == f"2 · {tokens[1]} over x0 at step 3 · heat {float(heat.min()):.3g} → {float(heat.max()):.3g}"
    assert [c for _, c in shown.grid] == [label for label, _ in shown.tokens]
    assert all(image.size == (64, 64) for image, _ in shown.grid)
    assert np.array_equal(pixels(shown.grid[1][0]), pixels(overlay))
    other = inspector.inside([inside_run], 0, 3, 0).overlay[0]
    assert np.abs(pixels(other).astype(int) - pixels(overlay)).mean() > 5  # another word, another map
    later = inspector.inside([inside_run], 0, 5, 1).overlay[0]
    assert np.abs(pixels(later).astype(int) - pixels(overlay)).mean() > 1  # another step
    assert pixels(overlay).std() > 10
    assert inspector.inside([inside_run], 0, 3, 99).token == 0  # not one of this run's: the first
    at_start = inspector.inside([inside_run], 0, 0, 1)  # kept at step 0, where no map is shown
    assert at_start.token == 1 and at_start.tokens == shown.tokens and at_start.grid == []


def test_heat_overlay_colours_each_map_from_its_min_to_its_max():
    """Half a map at its max, half at its min, over a mid-grey picture: the halves blend inferno's
    brightest and darkest colours half and half with the grey."""
    from pipelines.previews import INFERNO, heat_overlay

    heat = torch.zeros(2, 4, 4)
    heat[0, :, :2] = 0.3  # left half hot
    heat[1] = 0.2  # flat: all at its min
    picture = torch.full((16, 16, 3), 128, dtype=torch.uint8)
    out = heat_overlay(picture, heat).numpy().astype(int)
    assert out.shape == (2, 16, 16, 3)
    assert (np.abs(out[0, :, :3] - (np.array(INFERNO[-1]) + 128) / 2) <= 1).all()
    assert (np.abs(out[0, :, -3:] - (np.array(INFERNO[0]) + 128) / 2) <= 1).all()
    assert (np.abs(out[1] - (np.array(INFERNO[0]) + 128) / 2) <= 1).all()


def test_without_recorded_attention_one_line_says_how_to_get_it(recorded, inspector):
    shown = inspector.inside([recorded], 0, 3)
    assert shown.attention_note == ("No attention maps in this run: tick “Record attention maps” before Generate "
                                    "to see where each word looks.")
    assert shown.tokens == [] and shown.overlay is None and shown.grid == [] and len(shown.guidance) == 3


def test_the_panel_updates_show_each_row_only_with_pictures_in_it(inside_run, recorded, inspector):
    updates = inspector.inside_updates([inside_run, recorded], inside_run.id, 3)
    assert len(updates) == 15
    assert [u.visible for u in updates if isinstance(u, (gr.Row, gr.Column))] == [True, True, True]
    assert len(updates[-1]) == len(inside_run.frames[0].tokens)  # the grid
    updates = inspector.inside_updates([inside_run, recorded], recorded.id, 0)
    assert [u.visible for u in updates if isinstance(u, (gr.Row, gr.Column))] == [False, False, False]
    assert inspector.inside_updates([], None, 0)[0] == ""
    # the chips: the picked run's tokens, the choice kept where the run has it
    chips = inspector.token_chips([inside_run, recorded], inside_run.id, 2)
    assert chips.value == 2 and [tuple(c) for c in chips.choices] == inspector.inside([inside_run], 0, 0).tokens
    assert inspector.token_chips([inside_run, recorded], recorded.id, 2).value is None  # no maps in that run
    overlay = inspector.overlay_update([inside_run], inside_run.id, 4, 2)
    assert overlay.label == inspector.inside([inside_run], 0, 4, 2).overlay[1] and overlay.value is not None
    assert inspector.overlay_update([inside_run], inside_run.id, 0, 2).value is None


def test_download_tensors_gives_the_runs_file_or_says_why_not(cache, tiny_dir, inspector, tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(gr.Error, match="^'Nothing to download yet: run a generation first, then download its "
                                       "tensors.'$"):
        inspector.tensors_file([], None)
    store = RunStore(tmp_path)
    go, state = runner_session(store, cache, tiny_dir, fail_seed=13)
    assert go(1)
    views = store.views(state["runs"])
    path = inspector.tensors_file(views, views[0].id)
    assert path == views[0].tensors and load_file(path)["latents"].shape == (3, 4, 32, 32)
    assert inspector.tensors_file(views, None) == path  # no pick yet: the newest run
    running = RunView(tmp_path / "running", request=views[0].request)
    with pytest.raises(gr.Error, match="no tensors file yet: it is still running, and the file is written when it "
                                       "finishes or is stopped"):
        inspector.tensors_file([running], 0)
    running.ended, running.dropped = True, "dropped"
    with pytest.raises(gr.Error, match="not saved: its steps left the server's memory during the run"):
        inspector.tensors_file([running], 0)
    Path(path).unlink()
    with pytest.raises(gr.Error, match="This run's files are gone"):
        inspector.tensors_file(views, views[0].id)
