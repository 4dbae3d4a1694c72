"""The depth tab for every family: SD 1.x and SDXL with a depth ControlNet (img2img ControlNet pipelines),
SD 3 with an SD3ControlNetModel (from noise), Flux as FLUX.1-Depth-dev; each step watched, the final image the
bare pipeline's. Tiny random models (pipelines/tiny.py), built once a module, on CPU.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    FluxControlImg2ImgPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
)
from PIL import Image
from transformers import pipeline as transformers_pipeline

import app as app_module
from pipelines import ModelCache, ModelLoadError, generate, validate_request
from pipelines.families import family_named
from pipelines.tiny import save_tiny_controlnet, save_tiny_depth_estimator, save_tiny_family

from .conftest import pixels

FAMILIES = ("sd", "sdxl", "sd3", "flux")
CHECKPOINT = {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux-depth"}  # what --model / --depth-model is
SCHEDULER = {"sd": "DDIM"}  # the tiny SD checkpoint's own; the others' default is their own
STEPS, STRENGTH = 4, 0.75
SCENE = np.zeros((64, 64, 3), np.uint8)
SCENE[:] = (30, 40, 200)
SCENE[16:48, 16:48] = (220, 30, 30)
RAMP = np.tile(np.linspace(0.0, 10.0, 64, dtype=np.float32), (64, 1))  # far left, near right
BLOB = np.hypot(*np.mgrid[-32:32, -32:32]).astype(np.float32)  # near at the rim


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (checkpoint folder, ControlNet folder or None); plus "estimator" -> tiny DPT folder."""
    root = tmp_path_factory.mktemp("depth-families")
    built = {f: (save_tiny_family(root / CHECKPOINT[f], CHECKPOINT[f]),
                 save_tiny_controlnet(root / f"controlnet-{f}", f) if f != "flux" else None) for f in FAMILIES}
    built["estimator"] = save_tiny_depth_estimator(root / "estimator")
    return built


@pytest.fixture(scope="module")
def caches(models):
    """family -> a ModelCache started as `--controlnet <the family's> --depth-estimator <tiny DPT>`."""
    return {f: ModelCache(device="cpu", controlnet=str(models[f][1]) if models[f][1] else None,
                          depth_estimator=str(models["estimator"])) for f in FAMILIES}


def settings(family: str, **extra) -> dict:
    f = family_named(CHECKPOINT[family])
    return dict(mode="depth2img", prompt="a red square", seed=21, steps=STEPS, guidance_scale=f.default_guidance,
                width=64, height=64, scheduler=SCHEDULER.get(family, f.default_scheduler), preview="latent-rgb",
                view="x_t", negative_prompt="blurry" if f.negative_prompt else "", image=SCENE, strength=STRENGTH,
                **extra)


def run(cache, folder, raw):
    checkpoint = cache.checkpoint(str(folder))
    out = list(generate(validate_request(raw, checkpoint.limits()), cache, source=str(folder)))
    return out[:-1], out[-1]


def depth_picture(depth: np.ndarray) -> torch.Tensor:
    """What a user hands diffusers for a depth ControlNet: the map scaled to [0, 1], grey in R, G and B."""
    scaled = (depth - depth.min()) / (depth.max() - depth.min())
    return torch.from_numpy(scaled)[None, None].expand(1, 3, -1, -1)


def bare(family: str, models, req, control: torch.Tensor) -> Image.Image:
    """The plain diffusers depth pipeline of the family, loaded on its own, called as its docs show."""
    folder, controlnet = models[family]
    if family == "sd":
        pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            folder, controlnet=ControlNetModel.from_pretrained(controlnet), safety_checker=None,
            requires_safety_checker=False)
    elif family == "sdxl":
        pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
            folder, controlnet=ControlNetModel.from_pretrained(controlnet))
    elif family == "sd3":
        pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
            folder, controlnet=SD3ControlNetModel.from_pretrained(controlnet))
    else:
        pipe = FluxControlImg2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                generator=torch.Generator().manual_seed(req.seed), width=req.width, height=req.height,
                control_image=control)
    if req.negative_prompt:
        call["negative_prompt"] = req.negative_prompt
    if family != "sd3":  # SD 3's ControlNet pipeline starts from noise
        call.update(image=req.image, strength=req.strength)
    if family == "sd3":  # its pipeline samples the control latents from torch's global generator
        torch.manual_seed(req.seed)
    return pipe(**call).images[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_streams_a_frame_per_step_and_is_the_bare_pipelines_image(caches, models, family):
    folder = models[family][0]
    frames, final = run(caches[family], folder, settings(family, depth_map=RAMP))
    steps = STEPS if family == "sd3" else int(STEPS * STRENGTH)
    assert [f.step for f in frames] == list(range(1, steps + 1))
    assert all(f.total == steps for f in frames)
    expected = pixels(bare(family, models, final.request, depth_picture(RAMP)))
    assert np.abs(pixels(final.image).astype(int) - expected).max() <= 2
    # the uploaded map as given: its grey ramp is what the first frame shows, later frames show none
    shown = frames[0].depth_pixels.tensor().numpy()
    assert shown.shape == (64, 64, 3)
    assert np.abs(shown[..., 0].astype(int) - np.round(RAMP / 10 * 255).astype(int)).max() <= 1
    assert all(f.depth_pixels is None for f in frames[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_depth_maps_give_two_images(caches, models, family):
    folder = models[family][0]
    ramp = pixels(run(caches[family], folder, settings(family, depth_map=RAMP))[1].image).astype(int)
    blob = pixels(run(caches[family], folder, settings(family, depth_map=BLOB))[1].image).astype(int)
    assert np.abs(ramp - blob).max() > 2  # more than the bare-pipeline tolerance: a different image


@pytest.mark.parametrize("family", FAMILIES)
def test_the_estimated_depth_is_shown_on_the_first_frame(caches, models, family):
    frames, _ = run(caches[family], models[family][0], settings(family))
    # transformers' own depth-estimation pipeline: the prediction resized to the image, scaled to 0..255
    expected = np.asarray(transformers_pipeline("depth-estimation", model=str(models["estimator"]))(
        Image.fromarray(SCENE))["depth"], dtype=int)
    shown = frames[0].depth_pixels.tensor().numpy()
    assert np.ptp(shown) > 50  # a picture, not a flat field
    assert np.abs(shown[..., 0].astype(int) - expected).max() <= 2


def test_sd3_says_its_depth_run_starts_from_noise_and_repeats_its_seed(caches, models):
    _, final = run(caches["sd3"], models["sd3"][0], settings("sd3", depth_map=RAMP))
    torch.rand(7)  # torch's global generator moves on between runs (its pipeline samples control latents from it)
    _, again = run(caches["sd3"], models["sd3"][0], settings("sd3", depth_map=RAMP))
    assert np.array_equal(pixels(final.image), pixels(again.image))
    assert final.notes == ("strength: not used: StableDiffusion3ControlNetPipeline starts from noise; of the input "
                           "image only the depth map is used",)


def test_a_controlnet_that_does_not_fit_the_model_is_refused_naming_both(models):
    sd, sdxl, sd3 = (str(models[f][0]) for f in ("sd", "sdxl", "sd3"))
    sd_net, sdxl_net, sd3_net = (str(models[f][1]) for f in ("sd", "sdxl", "sd3"))
    cache = ModelCache(device="cpu", controlnet=sd_net)
    with pytest.raises(ModelLoadError) as err:
        cache.pipeline("depth2img", sdxl)
    assert str(err.value) == (
        f"--controlnet {sd_net!r} does not fit {sdxl!r} (SDXL): ControlNet vs UNet2DConditionModel: "
        "cross_attention_dim 32 vs 64; addition_embed_type None vs text_time; "
        "pass a depth ControlNet made for SDXL with --controlnet, e.g. diffusers/controlnet-depth-sdxl-1.0")
    with pytest.raises(ModelLoadError, match=r"does not fit .*\(SD 1\.x/2\.x\): ControlNet vs UNet2DConditionModel: "
                                             r"cross_attention_dim 64 vs 32; addition_embed_type text_time vs None"):
        ModelCache(device="cpu", controlnet=sdxl_net).pipeline("depth2img", sd)
    with pytest.raises(ModelLoadError, match=rf"--controlnet '{sd3_net}' is a SD3ControlNetModel, which does not fit "
                                             rf"'{sdxl}' \(SDXL takes a ControlNetModel\)"):
        ModelCache(device="cpu", controlnet=sd3_net).pipeline("depth2img", sdxl)
    with pytest.raises(ModelLoadError, match=rf"is a ControlNetModel, which does not fit '{sd3}' \(SD 3 takes a "
                                             r"SD3ControlNetModel\); .*stable-diffusion-3.5-large-controlnet-depth"):
        ModelCache(device="cpu", controlnet=sd_net).pipeline("depth2img", sd3)
    assert cache.pipeline("txt2img", sdxl) is not None  # the model itself still runs


def test_a_family_without_a_depth_model_names_the_flag(tiny_families, models):
    sd3, flux = str(models["sd3"][0]), str(tiny_families("flux"))
    plain = ModelCache(device="cpu")
    assert "depth2img" not in plain.checkpoint(sd3).modes
    with pytest.raises(ModelLoadError, match=rf"^'{sd3}' \(SD 3\) has no depth model; pass a depth ControlNet for "
                                             r"SD 3 with --controlnet, e.g. stabilityai/"):
        plain.pipeline("depth2img", sd3)
    with_net = ModelCache(device="cpu", controlnet=str(models["sd"][1]))
    assert "depth2img" not in with_net.checkpoint(flux).modes
    with pytest.raises(ModelLoadError, match=rf"^'{flux}' \(Flux.1\) has no depth model \(--controlnet '.*' does not "
                                             r"apply to Flux.1\); pass a depth checkpoint such as "
                                             r"black-forest-labs/FLUX.1-Depth-dev with --depth-model$"):
        with_net.pipeline("depth2img", flux)


def test_no_map_and_no_estimator_is_a_clear_refusal(models):
    folder = str(models["sdxl"][0])
    cache = ModelCache(device="cpu", controlnet=str(models["sdxl"][1]))
    with pytest.raises(ModelLoadError, match=rf"^depth_map: '{folder}' has no depth estimator; upload a depth map, "
                                             r"or start Stepwise with --depth-estimator"):
        run(cache, folder, settings("sdxl"))
    assert len(run(cache, folder, settings("sdxl", depth_map=RAMP))[0]) == int(STEPS * STRENGTH)  # still serving


def test_a_depth_route_that_cannot_run_stops_the_app_at_start(models, tiny_families):
    sdxl, sd_net, sdxl_net = str(models["sdxl"][0]), str(models["sd"][1]), str(models["sdxl"][1])
    def start(*argv):  # what main() does before it serves; it exits with "error: " and the message
        args = app_module.parse_args(list(argv))
        app_module.create_demo(args, ModelCache(device="cpu", controlnet=args.controlnet))

    with pytest.raises(ModelLoadError) as err:
        start("--model", sdxl, "--controlnet", sd_net)
    assert str(err.value).startswith(f"--controlnet {sd_net!r} does not fit {sdxl!r} (SDXL)")
    flux = str(tiny_families("flux"))
    with pytest.raises(ModelLoadError, match=rf"\(--controlnet '{sd_net}' does not apply to Flux.1\)"):
        start("--model", flux, "--controlnet", sd_net)
    # the fitting one: the depth tab is offered, its pipeline already loaded
    cache = ModelCache(device="cpu", controlnet=sdxl_net, depth_estimator=str(models["estimator"]))
    demo = app_module.create_demo(app_module.parse_args(["--model", sdxl, "--controlnet", sdxl_net]), cache)
    assert "depth2img" in cache.checkpoint(sdxl).pipelines and demo is not None
