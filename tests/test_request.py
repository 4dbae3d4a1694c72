import math

import numpy as np
import pytest
from PIL import Image

from pipelines import Limits, RequestError, validate_request

BASE = dict(mode="txt2img", prompt="a red circle", seed=1, steps=10, guidance_scale=7.5, width=64, height=64,
            scheduler="Euler", preview="latent-rgb")


def check(field, **changes):
    with pytest.raises(RequestError) as err:
        validate_request({**BASE, **changes})
    assert err.value.field == field
    return str(err.value)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("steps", 0, "between 1 and 150"),
        ("steps", 151, "between 1 and 150"),
        ("steps", 2.5, "whole number"),
        ("steps", "many", "must be a number"),
        ("guidance_scale", -1, "at least 0.0"),
        ("guidance_scale", 31, "at most 30.0"),
        ("guidance_scale", math.nan, "finite"),
        ("guidance_scale", math.inf, "finite"),
        ("width", 63, "between 64"),
        ("width", 100, "multiple of 8"),
        ("height", 4096, "between 64 and 2048"),
        ("seed", -2, "between -1"),
        ("seed", 2**32, "between -1"),
        ("scheduler", "Heun++", "choose one of DDIM"),
        ("preview", "magic", "choose one of latent-rgb"),
        ("view", "x_42", "choose one of x_t, x0"),
        ("prompt", 42, "must be text"),
        ("mode", "inpaint", "choose one of txt2img"),
    ],
)
def test_bad_fields_name_field_and_allowed_values(field, value, needle):
    assert needle in check(field, **{field: value})


def test_valid_request_keeps_values():
    req = validate_request(BASE)
    assert (req.steps, req.guidance_scale, req.width, req.seed, req.scheduler) == (10, 7.5, 64, 1, "Euler")


def test_seed_minus_one_draws_a_random_seed():
    seeds = {validate_request({**BASE, "seed": -1}).seed for _ in range(5)}
    assert all(0 <= s < 2**32 for s in seeds) and len(seeds) > 1


def test_too_many_pixels_for_the_budget():
    with pytest.raises(RequestError, match="budget of 4096 pixels") as err:
        validate_request({**BASE, "width": 128, "height": 64}, Limits(max_pixels=64 * 64))
    assert err.value.field == "width"


def test_image_modes_need_an_image():
    assert "upload an image" in check("image", mode="img2img")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_images_of_any_mode_become_rgb_at_the_requested_size(mode):
    image = Image.new(mode, (40, 30))
    req = validate_request({**BASE, "mode": "img2img", "image": image, "strength": 0.5})
    assert req.image.mode == "RGB" and req.image.size == (64, 64)


def test_strength_zero_is_refused():
    assert "above 0.0" in check("strength", mode="img2img", image=Image.new("RGB", (64, 64)), strength=0)


def test_unreadable_image_file(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello")
    assert "not a readable image" in check("image", mode="img2img", image=str(bad))


def test_depth_map_from_16_bit_png_keeps_its_values(tmp_path):
    depth = np.zeros((64, 64), np.uint16)
    depth[16:48, 16:48] = 50000
    Image.fromarray(depth).save(tmp_path / "d.png")
    req = validate_request({**BASE, "mode": "depth2img", "image": Image.new("RGB", (64, 64)),
                            "depth_map": str(tmp_path / "d.png")})
    assert req.depth_map.dtype == np.float32 and req.depth_map.max() == 50000


def test_flat_depth_map_is_refused():
    flat = Image.new("L", (64, 64), 128)
    assert "flat" in check("depth_map", mode="depth2img", image=Image.new("RGB", (64, 64)), depth_map=flat)


def test_settings_are_plain_data():
    req = validate_request({**BASE, "mode": "img2img", "image": Image.new("RGB", (64, 64)), "strength": 0.4})
    assert req.settings()["strength"] == 0.4 and "image" not in req.settings()
