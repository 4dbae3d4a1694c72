"""SDXL, SD 3 and Flux beside SD: every step watched, the final image the bare pipeline's.

Tiny random-weight pipelines of each family (pipelines/tiny.py, built once a session) on CPU.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from gradio_client import Client, handle_file
from PIL import Image

import app as app_module
from pipelines import ModelCache, RequestError, generate, validate_request
from pipelines.families import family_named

from .conftest import pixels
from .test_app import free_port

NEW = ("sdxl", "sd3", "flux")
BARE = {  # family -> the diffusers classes a user would call by hand
    "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline),
    "sd3": (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline),
    "flux": (FluxPipeline, FluxImg2ImgPipeline),
}
STEPS = 4
SCENE = np.zeros((64, 64, 3), np.uint8)
SCENE[:] = (30, 40, 200)
SCENE[16:48, 16:48] = (220, 30, 30)


def settings(family: str, mode: str = "txt2img", **extra) -> dict:
    f = family_named(family)
    raw = dict(mode=mode, prompt="a red square", seed=21, steps=STEPS, guidance_scale=f.default_guidance, width=64,
               height=64, scheduler=f.default_scheduler, preview="latent-rgb", view="x_t",
               negative_prompt="blurry" if f.negative_prompt else "")
    if mode == "img2img":
        raw.update(image=SCENE, strength=0.75)
    return {**raw, **extra}


def bare(family: str, folder, req) -> Image.Image:
    """The plain diffusers pipeline of the family, loaded on its own, called as its docs show."""
    txt2img, img2img = BARE[family]
    pipe = (txt2img if req.mode == "txt2img" else img2img).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                generator=torch.Generator().manual_seed(req.seed), width=req.width, height=req.height)
    if req.negative_prompt:
        call["negative_prompt"] = req.negative_prompt
    if req.mode == "img2img":
        call.update(image=req.image, strength=req.strength)
        if family == "sdxl":  # SDXL img2img takes its size from the image
            del call["width"], call["height"]
    return pipe(**call).images[0]


def run(cache, folder, raw):
    checkpoint = cache.checkpoint(str(folder))
    out = list(generate(validate_request(raw, checkpoint.limits()), cache, source=str(folder)))
    return out[:-1], out[-1]


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("family", NEW)
def test_one_frame_per_step_and_the_bare_pipelines_image(cache, tiny_families, family, mode):
    folder = tiny_families(family)
    frames, final = run(cache, folder, settings(family, mode))
    req = final.request
    assert [f.step for f in frames] == list(range(1, req.denoising_steps + 1)) and req.denoising_steps >= 3
    expected = pixels(bare(family, folder, req))
    assert np.abs(pixels(final.image).astype(int) - expected).max() <= 2
    assert cache.checkpoint(str(folder)).family.name == family


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("preview", ["latent-rgb", "tiny-vae", "full-vae"])
@pytest.mark.parametrize("family", NEW)
def test_previews_show_pictures_in_every_mode(cache, tiny_families, family, preview, mode):
    frames, final = run(cache, tiny_families(family), settings(family, mode, preview=preview, view="x0"))
    side = 32 if preview == "latent-rgb" else 64  # the tiny VAEs downscale 2x
    for frame in frames:
        for view in (frame.xt_pixels, frame.x0_pixels):
            picture = view.tensor()
            assert picture.shape == (side, side, 3) and picture.dtype == torch.uint8
            assert picture.float().std() > 2, "a flat preview"
    # 16 latent channels for SD3 and Flux (Flux's packed tokens unpacked), 4 for SDXL
    channels = family_named(family).latents.channels
    assert {tuple(f.latents.tensor().shape) for f in frames} == {(1, channels, 32, 32)}


@pytest.mark.parametrize("family", NEW)
def test_x0_at_the_last_step_is_the_final_latents(cache, tiny_families, family):
    # Euler's last step goes to sigma 0, where x_t after it is exactly the step's x0 estimate
    frames, _ = run(cache, tiny_families(family), settings(family, preview="full-vae"))
    last = frames[-1]
    diff = (last.x0_pixels.tensor().int() - last.xt_pixels.tensor().int()).abs()
    assert diff.max() <= 2
    # and early on the estimate is not x_t: the view shows something of its own
    assert (frames[0].x0_pixels.tensor().int() - frames[0].xt_pixels.tensor().int()).abs().max() > 10


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_noise_level_is_the_schedulers_sigma(cache, tiny_families, family):
    folder = str(tiny_families(family))
    frames, _ = run(cache, folder, settings(family))
    scheduler = cache.pipeline("txt2img", folder).scheduler
    levels = frames[0].schedule_levels()
    assert levels[0] == pytest.approx(1.0, abs=0.02) and levels[-1] == 0.0  # pure noise to clean, in sigma
    assert levels == sorted(levels, reverse=True) and len(levels) == STEPS + 1
    assert [f.sigma for f in frames] == pytest.approx(levels[1:])
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_each_family_offers_its_own_euler_and_only_fitting_schedulers(cache, tiny_families):
    sdxl = cache.checkpoint(str(tiny_families("sdxl"))).limits()
    assert "Euler" in sdxl.schedulers and "DPM++ 2M Karras" in sdxl.schedulers
    for family in ("sd3", "flux"):
        limits = cache.checkpoint(str(tiny_families(family))).limits()
        assert limits.schedulers == ("Euler",)
        with pytest.raises(RequestError, match="scheduler: .*DDIM is a sampler for noise-prediction models; this model "
                                               "is trained for flow matching, which runs with Euler"):
            validate_request(settings(family, scheduler="DDIM"), limits)


def test_size_multiples_and_native_sides_come_from_the_model():
    def pipe(vae_scale_factor, patch_size=None, sample=128):
        transformer = SimpleNamespace(config={"patch_size": patch_size}) if patch_size else None
        return SimpleNamespace(vae_scale_factor=vae_scale_factor, transformer=transformer, default_sample_size=sample)

    # the full-size models: VAE 8x, SD3 patches of 2, Flux packs 2x2
    assert family_named("sdxl").size_multiple(pipe(8)) == 8
    assert family_named("sd3").size_multiple(pipe(8, patch_size=2)) == 16
    assert family_named("flux").size_multiple(pipe(8)) == 16
    assert family_named("flux").native_side(pipe(8)) == 1024


def test_a_size_off_the_familys_multiple_is_refused_by_name(cache, tiny_families):
    limits = cache.checkpoint(str(tiny_families("flux"))).limits()
    limits = type(limits)(**{**limits.__dict__, "size_multiple": 16})  # as the full-size Flux has it
    with pytest.raises(RequestError, match=r"width: must be a multiple of 16 \(the model works on 16-pixel blocks\), "
                                           "got 72"):
        validate_request(settings("flux", width=72), limits)


def test_flux_has_no_negative_prompt_and_says_so(cache, tiny_families):
    limits = cache.checkpoint(str(tiny_families("flux"))).limits()
    assert limits.negative_prompt is False and limits.modes == ("txt2img", "img2img")
    req = validate_request(settings("flux", negative_prompt="blurry"), limits)
    assert req.negative_prompt == ""
    assert req.notes == ("negative_prompt: not used: Flux.1 has no negative conditioning (its guidance is distilled "
                         "into the model)",)


def test_a_mode_the_family_cannot_run_is_a_clear_refusal(cache, tiny_families):
    folder = str(tiny_families("sdxl"))
    limits = cache.checkpoint(folder).limits()
    with pytest.raises(RequestError) as err:
        validate_request(settings("sdxl", mode="depth2img", image=SCENE), limits)
    assert str(err.value) == (f"mode: depth2img is not available with this SDXL model; it runs txt2img, img2img: "
                              f"{folder!r} (SDXL) has no depth model; pass a depth ControlNet for SDXL with "
                              "--controlnet, e.g. diffusers/controlnet-depth-sdxl-1.0")
    flux = cache.checkpoint(str(tiny_families("flux"))).limits()
    assert flux.unavailable_modes["depth2img"].endswith(
        "pass a depth checkpoint such as black-forest-labs/FLUX.1-Depth-dev with --depth-model")
    with pytest.raises(Exception, match=r"\(SDXL\) has no depth model; pass a depth ControlNet for SDXL with --controlnet"):
        cache.pipeline("depth2img", folder)


def test_t5_cut_off_is_told_with_its_own_limit(cache, tiny_families):
    folder = str(tiny_families("flux"))
    long_prompt = "a red square " * 60  # 780 characters: one token each in the tiny T5 and CLIP
    _, final = run(cache, folder, settings("flux", prompt=long_prompt))
    assert any(n.startswith("prompt: ") and "CLIP reads 77" in n for n in final.notes)
    assert any("T5 reads 512" in n for n in final.notes)


@pytest.mark.parametrize("family", NEW)
def test_app_streams_every_step_for_each_family(tiny_families, family):
    """`python app.py --model FOLDER` with the family's tiny folder: /txt2img and /img2img stream their
    steps into the gallery, and the txt2img final image is the bare pipeline's."""
    folder = tiny_families(family)
    demo = app_module.create_demo(app_module.parse_args(["--model", str(folder)]), ModelCache(device="cpu"))
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    try:
        client = Client(demo.local_url, verbose=False)
        api = {k: v for k, v in settings(family).items() if k != "mode"}
        updates = list(client.submit(**api, api_name="/txt2img"))
        assert len(updates[-1][1]) == STEPS  # the gallery
        req = validate_request(settings(family))
        assert np.abs(pixels(Image.open(updates[-1][2])).astype(int) - pixels(bare(family, folder, req))).max() <= 2
        scene = folder.parent / "scene.png"
        Image.fromarray(SCENE).save(scene)
        updates = list(client.submit(**{**api, "image": handle_file(str(scene)), "strength": 0.75},
                                     api_name="/img2img"))
        assert len(updates[-1][1]) == int(STEPS * 0.75) and Image.open(updates[-1][2]).size == (64, 64)
    finally:
        demo.close()



def test_a_flux_model_without_a_guidance_input_says_guidance_is_not_used(tmp_path):
    from benchmarks.gpu_families import save_checkpoint  # tiny FLUX.1-schnell: guidance_embeds False

    folder = str(save_checkpoint(tmp_path / "schnell", "flux", full=False, device="cpu", dtype=torch.float32))
    cache = ModelCache(device="cpu")
    limits = cache.checkpoint(folder).limits()
    assert limits.guidance_ignored and limits.distilled_guidance
    req = validate_request(settings("flux", guidance_scale=3.5), limits)
    assert req.notes == ("guidance_scale: not used: this Flux.1 model takes no guidance (FLUX.1-schnell is distilled "
                         "to run without it)",)
    assert validate_request(settings("flux", guidance_scale=0.0), limits).notes == ()
    frames, final = run(cache, folder, settings("flux", guidance_scale=0.0))
    assert len(frames) == STEPS and final.image.size == (64, 64)


def test_flux_dev_takes_its_guidance(cache, tiny_families):
    assert not cache.checkpoint(str(tiny_families("flux"))).limits().guidance_ignored
    assert not cache.checkpoint(str(tiny_families("sdxl"))).limits().guidance_ignored
