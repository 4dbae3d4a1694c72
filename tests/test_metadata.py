"""Reading generation settings from images, in each format sd-parsers reads.

Each test file is written here with Pillow the way its tool writes it: A1111's PNG
`parameters` chunk and JPEG/WebP EXIF UserComment, Fooocus JSON, a ComfyUI graph,
InvokeAI metadata (current and legacy) and NovelAI's chunks.
"""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, PngImagePlugin

from pipelines import Limits
from pipelines.metadata import NO_SETTINGS, STEALTH_HEADER, read_parameters

from .conftest import CASES  # the inputs; the dynamic-prompts file is rebuilt below if absent

# AUTOMATIC1111 1.10 txt2img infotext: sampler and schedule type apart, the model, its version
A1111 = ("a red circle, blue background\nNegative prompt: blurry, dark\n"
         "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 77, Size: 64x96, "
         "Model hash: 0123abcd, Model: micro, Denoising strength: 0.35, Version: v1.10.1")
A1111_FIELDS = {"prompt": "a red circle, blue background", "negative_prompt": "blurry, dark", "seed": 77,
                "steps": 12, "guidance_scale": 4.5, "width": 64, "height": 96, "scheduler": "DPM++ 2M Karras",
                "strength": 0.35}


def png(path: Path, chunks: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    Image.new("RGB", (8, 8), (40, 90, 200)).save(path, pnginfo=info)
    return path


def exif_file(path: Path, text: str, fmt: str) -> Path:
    # A1111: piexif.helper.UserComment.dump(text, encoding="unicode") = b"UNICODE\0" + UTF-16BE
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8), (40, 90, 200)).save(path, fmt, exif=exif)
    return path


def stealth_png(path: Path, text: str) -> Path:
    """A1111's stealth_pnginfo ("stealth_pngcomp"): header, payload bits (32-bit), gzip'd text in
    the alpha channel's lowest bit, column by column."""
    payload = gzip.compress(text.encode())
    bits = np.unpackbits(np.frombuffer(STEALTH_HEADER + (len(payload) * 8).to_bytes(4, "big") + payload, np.uint8))
    height = 32
    width = -(-len(bits) // height)
    alpha = np.full(width * height, 254, np.uint8)
    alpha[: len(bits)] |= bits
    rgba = np.full((height, width, 4), 120, np.uint8)
    rgba[..., 3] = alpha.reshape(width, height).T
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def a1111(tmp_path, settings: str, name="a.png") -> Path:
    return png(tmp_path / name, {"parameters": f"a cat\n{settings}"})


# ---- AUTOMATIC1111 ----------------------------------------------------------------

def test_dynamic_prompts_template_lines_are_reported_not_swallowed(tmp_path):
    text = ("a cat, masterpiece\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, "
            "Size: 512x768, Model hash: abc, Model: v1-5\nTemplate: a {cat|dog}, masterpiece\nNegative Template: ugly")
    case = CASES / "a1111_dynprompts.png"
    path = case if case.exists() else png(tmp_path / "dyn.png", {"parameters": text})
    assert Image.open(path).info["parameters"] == text
    got = read_parameters(path)
    assert got.generator == "AUTOMATIC1111" and got.model == "v1-5"
    assert got.fields == {"prompt": "a cat, masterpiece", "negative_prompt": "ugly", "seed": 1234, "steps": 20,
                          "guidance_scale": 7.0, "width": 512, "height": 768, "scheduler": "Euler a"}
    assert got.notes == ("line after the settings line, not loaded: Template: a {cat|dog}, masterpiece",
                         "line after the settings line, not loaded: Negative Template: ugly")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_a1111_as_written_today_in_png_jpeg_and_webp(tmp_path, fmt, suffix):
    path = png(tmp_path / "a.png", {"parameters": A1111}) if fmt == "PNG" else \
        exif_file(tmp_path / f"a.{suffix}", A1111, fmt)
    got = read_parameters(path)
    assert got.generator == "AUTOMATIC1111" and got.model == "micro"
    assert got.fields == A1111_FIELDS
    assert got.notes == ("not used by this app: Version",)


def test_a1111_stealth_pnginfo_in_the_alpha_channel(tmp_path):
    got = read_parameters(stealth_png(tmp_path / "s.png", A1111))
    assert got.generator == "AUTOMATIC1111" and got.fields == A1111_FIELDS


@pytest.mark.parametrize("settings,scheduler", [
    ("Sampler: DPM++ 2M Karras", "DPM++ 2M Karras"),  # A1111 before 1.9 named the schedule in the sampler
    ("Sampler: DPM++ 2M, Schedule type: Automatic", "DPM++ 2M Karras"),  # 1.9+: Karras is DPM++ 2M's default
    ("Sampler: Euler a, Schedule type: Automatic", "Euler a"),
    ("Sampler: Euler, Schedule type: Uniform", "Euler"),
    ("Sampler: DDIM", "DDIM"),
    ("Sampler: UniPC", "UniPC"),
    ("Sampler: PLMS", "PNDM"),
    ("Sampler: PNDM", "PNDM"),  # as this app writes it
    ("Sampler: DPM++ 2M", "DPM++ 2M"),  # before 1.9, no schedule type: the checkpoint's own spacing
])
def test_a1111_sampler_and_schedule_map_to_the_apps_scheduler(tmp_path, settings, scheduler):
    got = read_parameters(a1111(tmp_path, f"Steps: 20, {settings}, CFG scale: 7, Seed: 1, Size: 64x64"))
    assert got.fields["scheduler"] == scheduler


@pytest.mark.parametrize("settings,note", [
    ("Sampler: DPM++ SDE, Schedule type: Karras", "sampler DPM++ SDE with schedule type Karras"),
    ("Sampler: Euler a, Schedule type: Karras", "sampler Euler a with schedule type Karras"),
    ("Sampler: DPM++ 2M, Schedule type: Exponential", "sampler DPM++ 2M with schedule type Exponential"),
])
def test_a_sampler_the_app_lacks_is_said_and_keeps_the_current_one(tmp_path, settings, note):
    got = read_parameters(a1111(tmp_path, f"Steps: 20, {settings}, CFG scale: 7, Seed: 1, Size: 64x64"))
    assert "scheduler" not in got.fields and got.fields["steps"] == 20
    assert got.notes == ("the file has no negative prompt: kept yours",
                         f"{note} is not offered here: kept your scheduler")


def test_a_scheduler_this_model_does_not_offer_is_said(tmp_path):
    got = read_parameters(a1111(tmp_path, "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1"),
                          schedulers=("DDIM", "Euler"))
    assert "scheduler" not in got.fields
    assert "scheduler DPM++ 2M Karras is not offered for this model: kept yours" in got.notes


def test_hires_denoising_strength_is_not_taken_for_img2img_strength(tmp_path):
    got = read_parameters(a1111(tmp_path, "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
                                          "Seed: 5, Size: 64x64, Denoising strength: 0.7, Hires upscale: 2, "
                                          "Hires steps: 10, Hires upscaler: Latent"))
    assert "strength" not in got.fields and got.fields["scheduler"] == "Euler a"
    assert got.notes == (
        "the file has no negative prompt: kept yours",
        "denoising strength 0.7 belongs to the hires pass (Hires upscale, Hires steps, Hires upscaler): not loaded",
        "not used by this app: Hires upscale, Hires steps, Hires upscaler",
    )


def test_values_outside_the_servers_limits_are_said_not_applied(tmp_path):
    path = a1111(tmp_path, "Steps: 200, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x768")
    got = read_parameters(path, Limits(max_side=256))
    assert got.fields == {"prompt": "a cat", "seed": 1, "guidance_scale": 7.0, "scheduler": "Euler"}
    assert got.notes == (
        "the file has no negative prompt: kept yours",
        "steps 200 does not fit the loaded model (steps: must be between 1 and 150, got 200): kept yours",
        "size 512x768 does not fit the loaded model (width: must be between 64 and 256, got 512): kept yours",
    )
    budget = read_parameters(a1111(tmp_path, "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 2048x1024",
                                   "b.png"))
    assert "width" not in budget.fields and "more than this server's budget of 1048576 pixels" in budget.notes[-1]


def test_values_that_are_not_numbers_are_said(tmp_path):
    got = read_parameters(a1111(tmp_path, "Steps: many, Sampler: Euler, CFG scale: high, Seed: 1.5, Size: 64x64"))
    assert got.fields == {"prompt": "a cat", "width": 64, "height": 64, "scheduler": "Euler"}
    assert got.notes[1:] == ("seed '1.5' is not a whole number: kept yours", "steps 'many' is not a number: kept yours",
                             "CFG scale 'high' is not a number: kept yours")


# ---- Fooocus --------------------------------------------------------------------------

# Fooocus 2.4 "fooocus" metadata scheme: JSON in the PNG `parameters` chunk (key set as in its own log)
FOOOCUS = {
    "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "aeb7e9e689",
    "clip_skip": 2, "full_negative_prompt": ["(worst quality:1.4)"], "full_prompt": ["cinematic still a goldfish"],
    "guidance_scale": 4, "loras": [], "metadata_scheme": "fooocus", "negative_prompt": "", "performance": "Speed",
    "prompt": "a smiling goldfish", "prompt_expansion": "a smiling goldfish, deep focus", "refiner_model": "None",
    "refiner_switch": 0.5, "resolution": "(768, 1280)", "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras",
    "seed": "6952411511246973023", "sharpness": 2, "steps": 30, "styles": "['Fooocus V2']", "vae": "Default (model)",
    "version": "Fooocus v2.4.3",
}


def test_fooocus_json(tmp_path):
    got = read_parameters(png(tmp_path / "f.png", {"parameters": FOOOCUS}))
    assert got.generator == "Fooocus" and got.model == "juggernautXL_v8Rundiffusion"
    assert got.fields == {"prompt": "a smiling goldfish", "steps": 30, "guidance_scale": 4.0, "width": 768,
                          "height": 1280}
    assert got.notes == (
        "the file has no negative prompt: kept yours",
        "sampler dpmpp_2m_sde_gpu with schedule type karras is not offered here: kept your scheduler",
        "seed 6952411511246973023 does not fit the loaded model (seed: must be between -1 and 4294967295, "
        "got 6952411511246973023): kept yours",
        "not used by this app: sharpness, adm_guidance, clip_skip, loras, metadata_scheme, performance, "
        "prompt_expansion, refiner_model, refiner_switch, styles, vae, version",
    )


def test_fooocus_never_blanks_the_users_prompts(tmp_path):
    blank = dict(FOOOCUS, prompt="", negative_prompt="", sampler="dpmpp_2m", seed="42")
    got = read_parameters(png(tmp_path / "f.png", {"parameters": blank}))
    assert "prompt" not in got.fields and "negative_prompt" not in got.fields
    assert got.fields["scheduler"] == "DPM++ 2M Karras" and got.fields["seed"] == 42
    assert got.notes[:2] == ("the file has no prompt: kept yours", "the file has no negative prompt: kept yours")


# ---- ComfyUI --------------------------------------------------------------------------

def comfy(tmp_path, graph: dict) -> Path:
    """A ComfyUI PNG: the API graph in `prompt`, the editor's workflow (with its links) in `workflow`."""
    links, n = [], 0
    for target, node in graph.items():
        for slot, (name, value) in enumerate(node["inputs"].items()):
            if isinstance(value, list):
                n += 1
                kind = {"clip": "CLIP", "model": "MODEL", "vae": "VAE"}.get(name, "CONDITIONING")
                links.append([n, int(value[0]), value[1], int(target), slot, kind])
    workflow = {"nodes": [{"id": int(k), "type": v["class_type"]} for k, v in graph.items()], "links": links}
    return png(tmp_path / "comfy.png", {"prompt": graph, "workflow": workflow})


def ksampler(seed, steps, cfg, sampler, scheduler, denoise, positive, latent):
    return {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "denoise": denoise, "model": ["4", 0], "positive": [positive, 0], "negative": ["7", 0],
        "latent_image": [latent, 0]}}


def text(words):
    return {"class_type": "CLIPTextEncode", "inputs": {"text": words, "clip": ["4", 1]}}


BASE_GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "micro.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}},
    "6": text("a red circle, blue background"),
    "7": text("blurry"),
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_comfyui_graph(tmp_path):
    graph = {**BASE_GRAPH, "3": ksampler(42, 14, 6.5, "euler_ancestral", "normal", 1.0, "6", "5")}
    got = read_parameters(comfy(tmp_path, graph))
    assert got.generator == "ComfyUI" and got.model == "micro.safetensors"
    assert got.fields == {"prompt": "a red circle, blue background", "negative_prompt": "blurry", "seed": 42,
                          "steps": 14, "guidance_scale": 6.5, "width": 64, "height": 96, "scheduler": "Euler a"}
    assert got.notes == ("not used by this app: SaveImage nodes",)


def test_comfyui_graph_with_two_samplers_and_two_prompts_says_which_was_taken(tmp_path):
    graph = {
        **BASE_GRAPH,
        "3": ksampler(42, 14, 6.5, "dpmpp_2m", "karras", 1.0, "10", "5"),
        "10": {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["11", 0]}},
        "11": text("a blue square"),
        "12": ksampler(43, 10, 5.0, "euler", "normal", 0.5, "6", "13"),  # a second, upscaled pass
        "13": {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                         "width": 128, "height": 192, "crop": "disabled"}},
    }
    got = read_parameters(comfy(tmp_path, graph))
    assert got.fields == {"prompt": "a red circle, blue background", "negative_prompt": "blurry", "seed": 42,
                          "steps": 14, "guidance_scale": 6.5, "width": 64, "height": 96,
                          "scheduler": "DPM++ 2M Karras"}
    assert got.notes[:2] == ("the graph has 2 samplers (#3, #12); loaded sampler #3",
                             "the sampler's prompt comes from 2 text nodes (#6, #11); loaded #6")


@pytest.mark.parametrize("sampler,scheduler,expected", [
    ("euler_ancestral", "normal", "Euler a"),
    ("sample_euler_ancestral", "normal", "Euler a"),  # ComfyUI before 2023
    ("euler", "sgm_uniform", "Euler"),
    ("dpmpp_2m", "karras", "DPM++ 2M Karras"),
    ("uni_pc", "simple", "UniPC"),
    ("ddim", "ddim_uniform", "DDIM"),
    ("dpmpp_2m", "normal", "DPM++ 2M"),  # evenly spaced: the app's DPM++ 2M
    ("lcm", "normal", None),
])
def test_comfyui_sampler_and_scheduler_map_to_the_apps_scheduler(tmp_path, sampler, scheduler, expected):
    graph = {**BASE_GRAPH, "3": ksampler(1, 20, 7.0, sampler, scheduler, 1.0, "6", "5")}
    got = read_parameters(comfy(tmp_path, graph))
    assert got.fields.get("scheduler") == expected
    if expected is None:
        assert f"sampler {sampler} with schedule type {scheduler} is not offered here: kept your scheduler" in got.notes


def test_comfyui_img2img_denoise_is_the_strength(tmp_path):
    graph = {**BASE_GRAPH, "3": ksampler(1, 20, 7.0, "ddim", "ddim_uniform", 0.8700000000000001, "6", "5")}
    got = read_parameters(comfy(tmp_path, graph))
    assert got.fields["strength"] == 0.87 and got.fields["scheduler"] == "DDIM"


# ---- InvokeAI -------------------------------------------------------------------------

def test_invokeai_metadata(tmp_path):
    meta = {"generation_mode": "img2img", "positive_prompt": "digital artwork, oil painting",
            "negative_prompt": "grainy, photo", "width": 64, "height": 64, "seed": 3293022630, "rand_device": "cpu",
            "cfg_scale": 8.0, "cfg_rescale_multiplier": 0.0, "steps": 35, "scheduler": "dpmpp_2m_k", "strength": 0.6,
            "model": {"model_name": "juggernautXL", "base_model": "sdxl", "model_type": "main"}}
    got = read_parameters(png(tmp_path / "i.png", {"invokeai_metadata": meta}))
    assert got.generator == "InvokeAI" and got.model == "juggernautXL"
    assert got.fields == {"prompt": "digital artwork, oil painting", "negative_prompt": "grainy, photo",
                          "seed": 3293022630, "steps": 35, "guidance_scale": 8.0, "width": 64, "height": 64,
                          "scheduler": "DPM++ 2M Karras", "strength": 0.6}
    assert got.notes == ("not used by this app: cfg_rescale_multiplier, generation_mode, rand_device",)


def test_invokeai_legacy_dream_line(tmp_path):
    got = read_parameters(png(tmp_path / "d.png", {"Dream": '"a red circle [blurry]" -s 25 -S 1234 -W 64 -H 128 '
                                                            '-C 7.5 -A k_euler_a'}))
    assert got.generator == "InvokeAI"
    assert got.fields == {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 1234, "steps": 25,
                          "guidance_scale": 7.5, "width": 64, "height": 128, "scheduler": "Euler a"}


# ---- NovelAI --------------------------------------------------------------------------

def test_novelai(tmp_path):
    comment = {"steps": 28, "height": 64, "width": 96, "scale": 11.0, "seed": 2253955223, "strength": 0.4,
               "noise": 0.0, "noise_schedule": "native", "sampler": "k_euler_ancestral",
               "uc": "lowres, bad anatomy"}
    got = read_parameters(png(tmp_path / "n.png", {
        "Title": "AI generated image", "Description": "masterpiece, a cat in space", "Software": "NovelAI",
        "Source": "Stable Diffusion 1D44365E", "Comment": comment}))
    assert got.generator == "NovelAI" and got.model == "Stable Diffusion"
    assert got.fields == {"prompt": "masterpiece, a cat in space", "negative_prompt": "lowres, bad anatomy",
                          "seed": 2253955223, "steps": 28, "guidance_scale": 11.0, "width": 96, "height": 64,
                          "scheduler": "Euler a", "strength": 0.4}
    assert got.notes == ("not used by this app: noise",)


def test_novelai_stealth_json_in_the_alpha_channel(tmp_path):
    chunks = {"Description": "a cat in space", "Software": "NovelAI", "Source": "NovelAI Diffusion V3 4BDE2A90",
              "Comment": json.dumps({"steps": 28, "scale": 5.0, "seed": 7, "sampler": "k_dpmpp_2m",
                                     "noise_schedule": "karras", "width": 64, "height": 64, "uc": "lowres"})}
    got = read_parameters(stealth_png(tmp_path / "s.png", json.dumps(chunks)))
    assert got.generator == "NovelAI" and got.model == "NovelAI Diffusion V3"
    assert got.fields == {"prompt": "a cat in space", "negative_prompt": "lowres", "seed": 7, "steps": 28,
                          "guidance_scale": 5.0, "width": 64, "height": 64, "scheduler": "DPM++ 2M Karras"}


# ---- no settings, and many readers in one process ----------------------------------

def test_images_without_settings_are_refused_with_the_reason(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    prose = png(tmp_path / "prose.png", {"parameters": "just a caption, no settings line"})
    Image.new("RGBA", (64, 64), (9, 9, 9, 255)).save(tmp_path / "alpha.png")
    for path in (plain, prose, exif_file(tmp_path / "p.jpg", "hello", "JPEG"), tmp_path / "alpha.png"):
        with pytest.raises(ValueError, match=f"^{re.escape(NO_SETTINGS)}$"):
            read_parameters(path)
    no_sampler = {k: v for k, v in BASE_GRAPH.items() if k != "8"}  # prompts and a latent, but no sampler node
    with pytest.raises(ValueError, match="^this ComfyUI image names no sampler that sd-parsers reads$"):
        read_parameters(comfy(tmp_path, no_sampler))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(OSError):
        read_parameters(tmp_path / "text.png")


def test_each_jpeg_gives_its_own_settings_never_a_previous_images(tmp_path):
    """sd-parsers 0.6 caches the last JPEG's UserComment under id(image); a new image that
    Python places at a freed one's address would get the old settings. Ours reads each file."""
    from sd_parsers.extractors import _jpeg_usercomment as cache

    first = exif_file(tmp_path / "a.jpg", A1111, "JPEG")
    second = exif_file(tmp_path / "b.jpg", A1111.replace("Seed: 77", "Seed: 78"), "JPEG")
    with Image.open(second) as image:
        cache._image_id, cache._usercomment = id(image), Image.open(first).getexif().get_ifd(0x8769)[0x9286][8:] \
            .decode("utf-16-be")  # the state a freed first image at this address leaves
        assert read_parameters(image).fields["seed"] == 78


def test_flux_guidance_is_written_and_read_as_forge_writes_it(tmp_path):
    from pipelines import validate_request
    from pipelines.generate import Final
    from pipelines.metadata import a1111_parameters, save_png

    flux = Limits(negative_prompt=False, distilled_guidance=True, family="Flux.1", size_multiple=16)
    req = validate_request({"mode": "txt2img", "prompt": "a cat", "seed": 5, "steps": 28, "guidance_scale": 3.5,
                            "width": 1024, "height": 1024, "scheduler": "Euler"}, flux)
    assert a1111_parameters(req, "flux1-dev", distilled_guidance=True) == (
        "a cat\nSteps: 28, Sampler: Euler, CFG scale: 1.0, Distilled CFG Scale: 3.5, Seed: 5, Size: 1024x1024, "
        "Model: flux1-dev")
    path = save_png(Final(Image.new("RGB", (16, 16)), req, "flux1-dev", 1.0), tmp_path / "f.png", "flux1-dev",
                    distilled_guidance=True)
    got = read_parameters(path, flux, schedulers=("Euler",))
    assert got.fields["guidance_scale"] == 3.5  # Forge's key, not CFG scale 1
    assert got.notes == ("the file has no negative prompt: kept yours",)
    # an SD run keeps writing CFG scale only
    assert "Distilled" not in a1111_parameters(validate_request({**req.settings(), "guidance_scale": 7.0}), "sd")
