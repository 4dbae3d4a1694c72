"""The bundled micro model loads with plain diffusers calls and follows colour / position words."""
import pytest
import torch

from pipelines import layout
from training.evaluate import analyse, load_depth2img

MODEL = layout.BUNDLED_FOLDER

CASES = [
    ("a red circle on the left, blue background", "red", "left", 0),
    ("a yellow triangle at the top, black background", "yellow", "top", 1),
    ("a white square in the center, purple background", "white", "center", 2),
    ("a green circle at the bottom, orange background", "green", "bottom", 3),
    ("a blue square on the right, yellow background", "blue", "right", 4),
    ("an orange triangle on the left, green background", "orange", "left", 5),
]


@pytest.fixture(scope="module")
def settings():
    return layout.read_card(MODEL)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(str(MODEL))
    p.set_progress_bar_config(disable=True)
    return p


def test_settings(settings):
    assert settings["scheduler"] in {"DDIM", "Euler", "Euler a", "DPM++ 2M Karras", "UniPC", "PNDM"}
    assert settings["width"] >= 64 and settings["height"] >= 64
    assert set(settings["vocabulary"]) == {"shapes", "colours", "positions"}
    lr = layout.read_latent_rgb(MODEL)
    assert len(lr["matrix"]) == 4 and all(len(r) == 3 for r in lr["matrix"]) and len(lr["bias"]) == 3


@pytest.fixture(scope="module")
def generated(pipe, settings):
    prompts = [c[0] for c in CASES]
    gens = [torch.Generator().manual_seed(c[3]) for c in CASES]
    images = pipe(prompts, width=settings["width"], height=settings["height"],
                  num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                  generator=gens).images
    return images, [analyse(im) for im in images]


def test_txt2img_colour(generated, settings):
    images, got = generated
    assert images[0].size == (settings["width"], settings["height"])
    colour_ok = sum(g["colour"] == c[1] for g, c in zip(got, CASES))
    assert colour_ok >= len(CASES) - 1, got


def test_txt2img_position(generated):
    _, got = generated
    position_ok = sum(g["position"] == c[2] for g, c in zip(got, CASES))
    assert position_ok >= len(CASES) - 1, got


def test_depth2img_runs(pipe, settings):
    from PIL import Image
    d = load_depth2img(str(MODEL), pipe, dtype=pipe.unet.dtype)
    init = Image.new("RGB", (64, 64), (30, 60, 220))
    out = d("a red circle, blue background", image=init, num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance_scale"], strength=0.8,
            generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (64, 64)
