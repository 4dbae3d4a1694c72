import queue
import sys
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import DPTForDepthEstimation, DPTImageProcessor

from pipelines import CancelToken, Final, Frame, ModelCache, generate, layout
from pipelines.generate import _Decoder
from pipelines.previews import HostBuffers, HostCopy, LatentRGB, X0Recorder, latent_rgb_for, picture_like
from pipelines.families import FLUX_LATENT_RGB, SD3_LATENT_RGB, SD_LATENT_RGB, SDXL_LATENT_RGB, family_named
from pipelines.schedulers import SCHEDULER_NAMES, make_scheduler

from .conftest import pixels


def run(req, cache, tiny_dir, cancel=None):
    out = list(generate(req, cache, cancel, source=str(tiny_dir)))
    frames = [o for o in out if isinstance(o, Frame)]
    finals = [o for o in out if isinstance(o, Final)]
    return frames, finals


def bare_pipeline(mode, tiny_dir, scheduler_name):
    """The plain diffusers pipeline, loaded on its own from the same folder."""
    if mode == "depth2img":
        base = StableDiffusionPipeline.from_pretrained(tiny_dir)
        pipe = StableDiffusionDepth2ImgPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            unet=UNet2DConditionModel.from_pretrained(tiny_dir / layout.DEPTH_UNET), scheduler=base.scheduler,
            depth_estimator=DPTForDepthEstimation.from_pretrained(tiny_dir / layout.DEPTH_ESTIMATOR),
            feature_extractor=DPTImageProcessor.from_pretrained(tiny_dir / layout.DEPTH_ESTIMATOR),
        )
    else:
        cls = StableDiffusionPipeline if mode == "txt2img" else StableDiffusionImg2ImgPipeline
        pipe = cls.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler_name, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_call(req, pipe, **extra):
    kwargs = dict(extra, prompt=req.prompt, negative_prompt=req.negative_prompt or None, num_inference_steps=req.steps,
                  guidance_scale=req.guidance_scale, generator=torch.Generator().manual_seed(req.seed))
    if req.mode == "txt2img":
        kwargs.update(width=req.width, height=req.height)
    else:
        kwargs.update(image=req.image, strength=req.strength)
    if req.depth_map is not None:
        kwargs["depth_map"] = torch.from_numpy(req.depth_map)[None]
    return pipe(**kwargs).images[0]


@pytest.mark.parametrize("preview", ["latent-rgb", "tiny-vae", "full-vae"])
@pytest.mark.parametrize("view", ["x_t", "x0"])
def test_one_frame_per_step_for_each_preview_and_view(cache, tiny_dir, make_request, preview, view):
    frames, finals = run(make_request(steps=5, preview=preview, view=view), cache, tiny_dir)
    assert [f.step for f in frames] == [1, 2, 3, 4, 5] and {f.total for f in frames} == {5}
    assert len(finals) == 1 and finals[0].image.size == (64, 64)
    # latent-rgb works at latent resolution (vae factor 2 here); decoders give full size
    expected = (32, 32) if preview == "latent-rgb" else (64, 64)
    assert all(f.image.size == expected and f.view == view for f in frames)
    timesteps = [f.timestep for f in frames]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 5
    assert len({pixels(f.image).tobytes() for f in frames}) == 5  # every step is a new picture


def test_a_frame_keeps_both_views_and_counts_its_bytes(cache, tiny_dir, make_request):
    frames, _ = run(make_request(steps=3, preview="full-vae", view="x0"), cache, tiny_dir)
    picture, latents = 64 * 64 * 3, 4 * 32 * 32 * 4  # uint8 RGB at full size; float32 latents at half
    timestep = frames[0].t.nbytes
    # x_t, x0, noise_pred and the guidance pair's two predictions: five latents
    assert frames[1].nbytes == timestep + 2 * picture + 5 * latents
    assert frames[0].nbytes == timestep + 2 * picture + 5 * latents + picture + latents  # and the start
    assert frames[0].image.size == (64, 64)
    assert np.array_equal(pixels(frames[0].image), pixels(frames[0].x0_pixels.pil()))  # the x0 view streams


def test_a_run_that_makes_no_picture_live_decodes_none_before_its_final_image(cache, tiny_dir, make_request,
                                                                            monkeypatch):
    """`live=False` (the app's runs on a CPU: each page update decodes the picture it shows): before
    the final image the run decodes nothing but 2x2 latents, once, to size its pictures' slots; each picture,
    read later, is the decoder's own on its frame's latents."""
    checkpoint = cache.checkpoint(str(tiny_dir))
    vae, sizes = checkpoint.full_vae, []

    def counted(latents):
        sizes.append(tuple(latents.shape[-2:]))
        return vae(latents)

    monkeypatch.setattr(type(checkpoint), "decoder", lambda self, preview: counted)
    frames, at_final = [], None
    for item in generate(make_request(steps=4, preview="full-vae"), cache, source=str(tiny_dir), live=False):
        if isinstance(item, Final):
            at_final = list(sizes), [f.xt_pixels.made or f.x0_pixels.made or f.start_pixels is not None
                                     and f.start_pixels.made for f in frames]
        else:
            frames.append(item)
    assert at_final == ([(2, 2)], [False] * 4) and counted.picture_scale > 1
    with torch.no_grad():
        for f in frames:
            assert torch.equal(f.xt_pixels.tensor(), vae(f.latents.tensor()).cpu())
            assert torch.equal(f.x0_pixels.tensor(), vae(f.x0.tensor()).cpu())
        assert torch.equal(frames[0].start_pixels.tensor(), vae(frames[0].start_latents.tensor()).cpu())


@pytest.mark.parametrize("view", ["x0", "x_t"])
def test_on_a_cpu_the_view_not_streamed_is_decoded_after_the_final_image_or_when_read(cache, tiny_dir, make_request,
                                                                                     monkeypatch, view):
    """A full-VAE decode costs about a UNet step on a CPU: before the final image the run decodes only the view
    it streams, at most one call a step (a step a newer one overtook waits too: `_Decoder`); the rest is decoded
    once the run's consumer is done, or by the first reader, once each. Every picture is the decoder's own on
    its frame's latents."""
    checkpoint = cache.checkpoint(str(tiny_dir))
    vae, calls = checkpoint.full_vae, []

    def counted(latents):
        calls.append(threading.current_thread().name)
        return vae(latents)

    monkeypatch.setattr(type(checkpoint), "decoder", lambda self, preview: counted)
    other = "xt_pixels" if view == "x0" else "x0_pixels"
    frames, before_final = [], None
    for item in generate(make_request(steps=4, preview="full-vae", view=view), cache, source=str(tiny_dir)):
        if isinstance(item, Final):
            before_final = list(calls)
        else:
            frames.append(item)
            if item.step == 2:  # read during the run: this thread decodes it
                early = getattr(frames[0], other).tensor().clone()
    live = before_final.count("stepwise-decode")
    assert 1 <= live <= 4 and before_final.count("MainThread") == 1  # the first step's streamed view is live
    assert frames[0].pixels.made and sum(f.pixels.made for f in frames) >= live
    for thread in threading.enumerate():
        if thread.name == "stepwise-deferred":
            thread.join(30)
    assert len(calls) == 4 + 4 + 1  # each step's two views, and the start: once each
    assert calls[live + 1:] == ["stepwise-deferred"] * (8 - live)
    assert torch.equal(early, getattr(frames[0], other).tensor())
    with torch.no_grad():
        for f in frames:
            assert torch.equal(f.xt_pixels.tensor(), vae(f.latents.tensor()).cpu())
            assert torch.equal(f.x0_pixels.tensor(), vae(f.x0.tensor()).cpu())
        assert torch.equal(frames[0].start_pixels.tensor(), vae(frames[0].start_latents.tensor()).cpu())


def test_the_decode_thread_makes_a_step_live_only_when_no_newer_step_or_end_waits():
    """The page shows the newest step: a step that a newer one (or the run's end) waits behind is made
    without its live picture (`make_frame`'s `live`), so previews never hold up the final image."""
    taken, release, made = threading.Event(), threading.Event(), []

    def make(step, live):
        made.append((step, live))
        if step == 1:
            taken.set()
            release.wait(10)  # steps 2 and 3 and the end queue up meanwhile
        return step

    out: queue.Queue = queue.Queue()
    decoder = _Decoder(make, out, torch.device("cpu"), threaded=True)
    decoder.submit(1)
    assert taken.wait(10)
    for step in (2, 3):
        decoder.submit(step)
    decoder.finish("final image")
    release.set()
    assert [out.get(timeout=10) for _ in range(4)] == [1, 2, 3, "final image"]
    assert made == [(1, True), (2, False), (3, False)]


@pytest.mark.parametrize("threaded", [True, False])
@pytest.mark.parametrize("live", [True, False])
def test_a_step_with_none_behind_it_is_made_live_only_when_the_run_asks(live, threaded):
    """`live=False` (the app's runs on a CPU: each page update decodes the picture it shows) makes no step
    live, even with nothing queued behind it; `live=True` each such step, on the decode thread or inline."""
    made, out = [], queue.Queue()
    decoder = _Decoder(lambda step, live: made.append((step, live)) or step, out, torch.device("cpu"),
                       threaded=threaded, live=live)
    for step in (1, 2):
        decoder.submit(step)
        assert out.get(timeout=10) == step  # each step alone in the queue
    decoder.finish(None)  # the thread ends: no decode thread outlives its run
    assert out.get(timeout=10) is None and made == [(1, live), (2, live)]


def test_a_runs_reads_of_the_pipelines_tokenizer_hold_the_run_lock(cache, tiny_dir, make_request, monkeypatch):
    """transformers' fast tokenizers set padding and truncation on one shared backend at every call: a run's
    own reads (truncation notes, the attention tokens) beside another run's encode_prompt once cut that run's
    empty negative prompt to 2 tokens instead of the tokenizer's 20 (two runs on one Ray replica)."""
    tokenizer = cache.pipeline("txt2img", str(tiny_dir)).tokenizer
    call, held = type(tokenizer).__call__, []

    def watched(self, *args, **kwargs):
        if self is tokenizer:
            held.append(cache.run_lock.locked())
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", watched)
    long = " ".join(["a red circle on the left"] * 8)  # longer than the tokenizer reads: a truncation note
    frames, finals = run(make_request(prompt=long, record_attention=True), cache, tiny_dir)
    assert frames[0].tokens and any(note.startswith("prompt:") for note in finals[0].notes)
    assert len(held) >= 4 and all(held)  # notes, attention tokens, the pipeline's prompt and negative prompt


def test_concurrent_runs_in_one_process_make_each_runs_own_pixels(cache, tiny_dir, make_request):
    """Two runs at once on one cache, as on a replica (`pipelines.workers.RUNS_PER_REPLICA`): one denoises,
    the other waits for the device; the views each run defers are made beside the next run."""
    requests = {seed: make_request(seed=seed, preview="full-vae", view="x0", record_attention=True)
                for seed in range(4)}
    alone = {seed: run(req, cache, tiny_dir) for seed, req in requests.items()}
    together: dict[int, tuple] = {}

    def user(seeds):
        for seed in seeds:
            together[seed] = run(requests[seed], cache, tiny_dir)

    users = [threading.Thread(target=user, args=(seeds,)) for seeds in ([0, 2], [1, 3])]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(120)
    assert sorted(together) == list(range(4))
    for seed, (frames, finals) in together.items():
        assert np.array_equal(pixels(finals[0].image), pixels(alone[seed][1][0].image))
        for mine, theirs in zip(frames, alone[seed][0], strict=True):
            assert torch.equal(mine.xt_pixels.tensor(), theirs.xt_pixels.tensor())
            assert torch.equal(mine.x0_pixels.tensor(), theirs.x0_pixels.tensor())


def test_x0_view_differs_from_x_t(cache, tiny_dir, make_request):
    xt, _ = run(make_request(view="x_t", preview="full-vae"), cache, tiny_dir)
    x0, _ = run(make_request(view="x0", preview="full-vae"), cache, tiny_dir)
    assert not np.array_equal(pixels(xt[0].image), pixels(x0[0].image))


@pytest.mark.parametrize("mode,scheduler", [
    ("txt2img", "Euler a"), ("txt2img", "DPM++ 2M Karras"), ("txt2img", "PNDM"),
    ("img2img", "DDIM"), ("img2img", "UniPC"),
    ("depth2img", "Euler"), ("depth2img", "DDIM"),
])
def test_final_image_is_pixel_identical_to_bare_diffusers(cache, tiny_dir, make_request, mode, scheduler):
    req = make_request(mode, scheduler=scheduler, preview="full-vae", view="x0", steps=6)
    _, finals = run(req, cache, tiny_dir)
    expected = bare_call(req, bare_pipeline(mode, tiny_dir, scheduler))
    assert np.array_equal(pixels(finals[0].image), pixels(expected))


@pytest.mark.parametrize("scheduler", ["Euler", "Euler a", "DDIM", "DPM++ 2M Karras", "PNDM"])
def test_x_t_is_the_pipelines_latents_in_variance_preserving_form(cache, tiny_dir, make_request, scheduler):
    """A frame's x_t is the bare pipeline's latents after the step; Euler-type samplers'
    (x0 + sigma * noise) divided by sqrt(sigma^2 + 1), sigma of those latents, the others' as they are."""
    req = make_request(steps=5, scheduler=scheduler)
    frames, _ = run(req, cache, tiny_dir)
    pipe, expected = bare_pipeline("txt2img", tiny_dir, scheduler), []

    def keep(p, i, t, tensors):
        sigma = p.scheduler.sigmas[p.scheduler.step_index] if scheduler.startswith("Euler") else 0.0
        expected.append(tensors["latents"] / (sigma**2 + 1) ** 0.5)
        return tensors

    bare_call(req, pipe, callback_on_step_end=keep)
    assert len(frames) == len(expected) == (6 if scheduler == "PNDM" else 5)
    for frame, latents in zip(frames, expected):
        assert torch.allclose(frame.latents.tensor(), latents, atol=1e-6)
        shown = cache.checkpoint(str(tiny_dir)).latent_rgb(latents)
        assert np.array_equal(pixels(frame.xt_pixels.pil()), shown.numpy())


def test_uploaded_depth_map_is_used_and_shown(cache, tiny_dir, make_request):
    depth = np.zeros((64, 64), np.float32)
    depth[:, 32:] = 1.0  # right half near
    req = make_request("depth2img", depth_map=depth)
    frames, finals = run(req, cache, tiny_dir)
    shown = pixels(frames[0].depth)[..., 0].astype(int)
    assert shown[:, -4:].mean() > 200 and shown[:, :4].mean() < 50  # near is light
    expected = bare_call(req, bare_pipeline("depth2img", tiny_dir, "Euler"))
    assert np.array_equal(pixels(finals[0].image), pixels(expected))


def test_same_seed_same_pixels_other_seed_other_pixels(cache, tiny_dir, make_request):
    a = run(make_request(seed=11), cache, tiny_dir)[1][0].image
    b = run(make_request(seed=11), cache, tiny_dir)[1][0].image
    c = run(make_request(seed=12), cache, tiny_dir)[1][0].image
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "depth2img"])
def test_cancel_stops_within_a_step_and_frees_the_lock(cache, tiny_dir, make_request, mode):
    token = CancelToken()
    frames = []
    for item in generate(make_request(mode, steps=30, strength=1.0), cache, token, source=str(tiny_dir)):
        assert isinstance(item, Frame), "a cancelled run must not produce a final image"
        frames.append(item)
        if item.step == 2:
            token.cancel()
    assert 2 <= len(frames) <= 3
    assert not cache.run_lock.locked()


def test_closing_the_stream_cancels_the_run(cache, tiny_dir, make_request):
    stream = generate(make_request(steps=30), cache, source=str(tiny_dir))
    next(stream)
    stream.close()  # what Gradio does when a client goes away
    assert not cache.run_lock.locked()
    assert not any(t.name == "stepwise-run" for t in threading.enumerate())


def test_one_runs_cancel_leaves_another_running(cache, tiny_dir, make_request):
    mine, theirs = CancelToken(), CancelToken()
    mine.cancel()
    assert run(make_request(), cache, tiny_dir, cancel=mine)[1] == []
    assert len(run(make_request(), cache, tiny_dir, cancel=theirs)[1]) == 1


def test_each_run_gets_its_own_scheduler(cache, tiny_dir, make_request):
    shared = cache.pipeline("txt2img", str(tiny_dir))
    before = shared.scheduler
    run(make_request(scheduler="DPM++ 2M Karras"), cache, tiny_dir)
    assert shared.scheduler is before and type(before).__name__ == "DDIMScheduler"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_computed_from_model_output_matches_ddim_own(prediction_type):
    """The fallback x0 (for schedulers that do not return it) agrees with DDIM's."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(10)
    recorder = X0Recorder(sched)
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = sched.timesteps[3]
    sched.step(output, t, sample)
    assert torch.allclose(recorder._x0_from_output(output, t, sample), recorder.x0, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_gives_an_x0(cache, tiny_dir, make_request, name):
    frames, finals = run(make_request(scheduler=name, view="x0", steps=4), cache, tiny_dir)
    # one frame per UNet evaluation: PNDM (PLMS) evaluates its first timestep twice
    assert len(frames) == frames[0].total == (5 if name == "PNDM" else 4) and len(finals) == 1


@pytest.mark.parametrize("name, channels, scaling, rows", [
    ("sd", 4, 0.18215, SD_LATENT_RGB), ("sdxl", 4, 0.13025, SDXL_LATENT_RGB),
    ("sd3", 16, 1.5305, SD3_LATENT_RGB), ("flux", 16, 0.3611, FLUX_LATENT_RGB),
])
def test_each_familys_real_vae_uses_its_published_map(name, channels, scaling, rows):
    class RealVAE:  # the full-size VAE config of the family (FACTS.md)
        config = {"latent_channels": channels, "scaling_factor": scaling, "block_out_channels": [128, 256, 512, 512]}

    m = latent_rgb_for(None, RealVAE(), family_named(name).latents)
    assert m.matrix.shape == (channels, 3) and torch.equal(m.matrix, torch.tensor(rows))
    # and a family's map is never taken for another's latent space
    others = [f for f in ("sd", "sdxl", "sd3", "flux") if f != name]
    assert not any(family_named(f).latents.is_published_vae(RealVAE.config) for f in others)


def test_fitted_map_tracks_the_vae(cache, tiny_dir):
    vae = cache.pipeline("txt2img", str(tiny_dir)).vae
    fitted = LatentRGB.fit(vae, seed=1)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * vae.config.scaling_factor
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    target = torch.nn.functional.adaptive_avg_pool2d(decoded, 16)[0].permute(1, 2, 0).reshape(-1, 3)
    approx = (torch.einsum("bchw,cr->bhwr", latents, fitted.matrix) + fitted.bias).reshape(-1, 3)
    # the linear map explains a real share of the decode (random VAE: weak, but not zero)
    residual = ((approx - target) ** 2).mean() / target.var()
    assert residual < 0.9


@pytest.fixture(scope="module")
def inline_cache():
    """Previews decoded inline in the step callback instead of on the decode thread."""
    return ModelCache(device="cpu", overlap_decode=False)


@pytest.mark.parametrize("mode", ["txt2img", "depth2img"])
def test_decode_thread_and_inline_decode_agree(cache, inline_cache, tiny_dir, make_request, mode):
    req = make_request(mode, preview="full-vae", view="x0", steps=8, scheduler="DDIM", strength=1.0)
    assert cache.overlap_decode and not inline_cache.overlap_decode
    frames, finals = run(req, cache, tiny_dir)
    assert [f.step for f in frames] == list(range(1, 9))
    inline_frames, inline_finals = run(req, inline_cache, tiny_dir)
    assert np.array_equal(pixels(finals[0].image), pixels(inline_finals[0].image))
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(frames, inline_frames))
    expected = bare_call(req, bare_pipeline(mode, tiny_dir, "DDIM"))
    assert np.array_equal(pixels(finals[0].image), pixels(expected))


def test_decode_thread_stops_with_a_cancelled_run(cache, tiny_dir, make_request):
    token = CancelToken()
    for item in generate(make_request(steps=40), cache, token, source=str(tiny_dir)):
        if item.step == 2:
            token.cancel()
    time.sleep(0.2)
    assert not any(t.name in ("stepwise-run", "stepwise-decode") for t in threading.enumerate())
    assert not cache.run_lock.locked()


# Frame fields that are host copies of the run's tensors and pictures
HOST_COPIES = ("t", "xt_pixels", "x0_pixels", "latents", "depth_pixels", "start_pixels", "start_latents", "x0",
               "noise_pred", "noise_pred_text", "noise_pred_uncond", "attention")


def test_a_runs_host_memory_is_allocated_once_per_kind_not_per_step(cache, tiny_dir, make_request, monkeypatch):
    """Every host copy a frame keeps is a row of a buffer its run allocated once: as many allocations
    (and distinct storages) for 12 steps as for 4, nothing allocated that no frame holds, and each row
    holds its own step's values, as the bare pipeline made them."""
    made = []

    class Counted(HostBuffers):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(sys.modules["pipelines.generate"], "HostBuffers", Counted)
    allocations, storages = {}, {}
    for steps in (4, 12):
        req = make_request(steps=steps, preview="full-vae", view="x0", record_attention=True)  # every kind of copy
        frames, finals = run(req, cache, tiny_dir)
        host = made[-1]
        copies = [getattr(f, name) for f in frames for name in HOST_COPIES if getattr(f, name) is not None]
        copies.append(frames[0].schedule.timesteps)
        allocations[steps] = host.allocations
        storages[steps] = {c.tensor().untyped_storage().data_ptr() for c in copies}
        assert host.nbytes == sum(c.nbytes for c in copies)  # every row holds a frame's copy
        pipe, expected = bare_pipeline("txt2img", tiny_dir, req.scheduler), []

        def keep(p, i, t, tensors, expected=expected):
            expected.append(tensors["latents"] / (p.scheduler.sigmas[p.scheduler.step_index] ** 2 + 1) ** 0.5)
            return tensors

        final = bare_call(req, pipe, callback_on_step_end=keep)
        assert len(frames) == len(expected) == steps
        for frame, latents in zip(frames, expected):
            assert torch.allclose(frame.latents.tensor(), latents, atol=1e-6)
        assert np.array_equal(pixels(finals[0].image), pixels(final))
    assert len(made) == 2
    # the run's timesteps; per step t, x_t, x0, noise_pred, the guidance pair, attention and both views'
    # pictures; the start's latents and picture
    assert allocations[4] == allocations[12] == len(storages[4]) == len(storages[12]) == 12


class _TensorOps(torch.overrides.TorchFunctionMode):
    """Every torch function, tensor method and tensor attribute used on this thread while active."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["txt2img", "depth2img"])
def test_the_step_callback_only_hands_over_references(cache, inline_cache, tiny_dir, make_request, mode):
    """On the denoising thread the step callback touches no tensor (no x0, no scaling, no copy): the
    decode thread does all of that. Inline decoding does it in the callback, which shows the check
    sees what a callback does."""
    from benchmarks.callback import wrapped_step_callbacks

    def watched(seen):
        def wrap(callback):
            def call(*args):
                with _TensorOps(seen):
                    return callback(*args)

            return call

        return wrap

    req = make_request(mode, steps=3, scheduler="Euler", record_attention=True, strength=1.0)
    threaded, inline = [], []
    with wrapped_step_callbacks(watched(threaded)):
        frames, _ = run(req, cache, tiny_dir)
    with wrapped_step_callbacks(watched(inline)):
        inline_frames, _ = run(req, inline_cache, tiny_dir)
    assert len(frames) == len(inline_frames) == 3
    assert threaded == []
    assert {"div", "copy_"} <= set(inline)  # Euler's x_t scaling, the host copies


def test_host_buffers_refuse_a_step_that_does_not_fit_and_host_copies_refuse_device_tensors():
    host = HostBuffers(torch.device("cpu"))
    host.copies({"latents": torch.zeros(1, 4, 8, 8)}, row=0, rows=3)
    with pytest.raises(ValueError, match=r"^latents: \(3, 1, 4, 8, 9\) torch.float32 does not fit the run's buffer "
                                         r"of \(3, 1, 4, 8, 8\) torch.float32$"):
        host.copies({"latents": torch.zeros(1, 4, 8, 9)}, row=1, rows=3)
    with pytest.raises(ValueError, match="^latents: .* torch.float16 does not fit"):
        host.copies({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.float16)}, row=1, rows=3)
    assert host.allocations == 1 and host.nbytes == 3 * 4 * 8 * 8 * 4
    with pytest.raises(ValueError, match="^HostCopy holds host tensors, got one on meta; copy device tensors "
                                         "through HostBuffers$"):
        HostCopy(torch.empty(2, device="meta"))


def test_compiled_unet_streams_every_step_without_recompiling(tiny_dir, make_request, monkeypatch):
    """--compile (ModelCache(compile_unet=True)): previews every step, the final image as the bare
    pipeline's, and a second run reuses the compiled graphs (the guidance hook and the step callback
    come new with each run). The eager backend traces as Dynamo does for a GPU, without generating code."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager", **kw))
    torch._dynamo.reset()
    try:
        compiled = ModelCache(device="cpu", compile_unet=True)
        assert compiled.pipeline("txt2img", str(tiny_dir)).unet._compiled_call_impl is not None
        req = make_request(steps=4, preview="full-vae", view="x0", scheduler="DDIM")
        run(req, compiled, tiny_dir)  # traces
        traced = dict(counters["stats"])
        for _ in range(2):
            frames, finals = run(req, compiled, tiny_dir)
            assert [f.step for f in frames] == [1, 2, 3, 4]
        assert dict(counters["stats"]) == traced and traced["unique_graphs"] > 0  # nothing traced again
        expected = bare_call(req, bare_pipeline("txt2img", tiny_dir, "DDIM"))
        assert np.array_equal(pixels(finals[0].image), pixels(expected))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("preview", ["latent-rgb", "full-vae"])
def test_picture_like_is_the_size_and_dtype_the_decoder_makes(cache, tiny_dir, preview):
    checkpoint = cache.checkpoint(str(tiny_dir))
    decode = checkpoint.decoder(preview)
    latents = torch.randn(1, checkpoint.base.vae.config.latent_channels, 5, 3)
    for _ in range(2):  # the second from the scale kept on the decoder
        like = picture_like(decode, latents)
        assert like.shape == decode(latents).shape and like.dtype == torch.uint8
