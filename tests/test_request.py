import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import Limits, RequestError, validate_request

from .conftest import CASES  # ../shared/cases: the issue-16 inputs

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


# -- input images: decoded once, here, from the file the user sent ------------------------------

IMG2IMG = dict(BASE, mode="img2img", strength=1.0)
DEPTH = dict(BASE, mode="depth2img", strength=1.0, image=Image.new("RGB", (64, 64)))


def ramp(mode: str, low: float, high: float) -> Image.Image:
    """An 8x64 horizontal ramp from `low` (left) to `high` (right) in a wide grey mode."""
    values = np.linspace(low, high, 64)[None].repeat(8, 0)
    if mode == "I;16B":
        return Image.frombytes(mode, (64, 8), values.astype(">u2").tobytes())
    return Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))


def test_16_bit_depth_map_from_the_case_file_keeps_its_full_range():
    req = validate_request({**DEPTH, "depth_map": str(CASES / "depth16.png")})
    sent = np.asarray(Image.open(CASES / "depth16.png")).astype(np.float32)
    assert req.depth_map.dtype == np.float32 and np.array_equal(req.depth_map, sent)
    assert (req.depth_map.min(), req.depth_map.max()) == (1000, 60000)
    assert (req.depth_map[:, 0] == 60000).all() and (req.depth_map[:, -1] == 1000).all()
    assert (np.diff(req.depth_map, axis=1) < 0).all()  # near (left) to far (right), in order
    assert req.notes == ()


@pytest.mark.parametrize("mode,ext,low,high", [("I;16", "png", 60000, 1000), ("I;16B", "tif", 60000, 1000),
                                               ("I", "tif", -30000, 90000), ("F", "tif", 0.9, 0.01)])
def test_wide_depth_maps_keep_every_value(tmp_path, mode, ext, low, high):
    image = ramp(mode, low, high)
    image.save(tmp_path / f"d.{ext}")
    req = validate_request({**DEPTH, "depth_map": str(tmp_path / f"d.{ext}")})
    assert np.array_equal(req.depth_map, np.asarray(image).astype(np.float32))
    assert req.depth_map[0, 0] == np.float32(low) and req.depth_map[0, -1] == np.float32(high)


def test_16_bit_img2img_input_is_scaled_to_8_bits_with_a_note():
    req = validate_request({**IMG2IMG, "image": str(CASES / "gray16.png")})
    sent = np.asarray(Image.open(CASES / "gray16.png")).astype(int)
    got = np.asarray(req.image)
    assert got.shape == (64, 64, 3) and (got == got[..., :1]).all()
    assert np.array_equal(got[..., 0], np.round(sent / 257))  # 65535 / 255 = 257
    assert list(got[0, [0, 1, 2, 32, 63], 0]) == [0, 4, 8, 130, 255]
    assert req.notes == ("image: 16-bit grey (I;16) scaled to 8 bits: 0..65535 became 0..255",)


@pytest.mark.parametrize("mode,low,high,note", [
    ("I;16B", 0, 65535, "image: 16-bit grey (I;16B) scaled to 8 bits: 0..65535 became 0..255"),
    ("I", -1000, 3000, "image: 32-bit integer grey (I) scaled to 8 bits: -1000..3000 became 0..255"),
    ("F", 0.25, 0.75, "image: 32-bit float grey (F) scaled to 8 bits: 0.25..0.75 became 0..255"),
])
def test_wide_img2img_inputs_use_their_range(mode, low, high, note):
    req = validate_request({**IMG2IMG, "image": ramp(mode, low, high), "height": 8 * 8})
    row = np.asarray(req.image.resize((64, 8)))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row.astype(int)) >= 0).all()
    assert req.notes[0] == note


def test_float_image_with_nan_is_refused():
    values = np.zeros((64, 64), np.float32)
    values[3, 3] = np.nan
    message = check("image", **{**IMG2IMG, "image": Image.fromarray(values)})
    assert message == "image: holds NaN or infinite pixel values"


def test_transparent_png_is_composited_on_white_with_a_note():
    req = validate_request({**IMG2IMG, "image": str(CASES / "rgba_transparent.png")})
    alpha = np.asarray(Image.open(CASES / "rgba_transparent.png"))[..., 3]
    got = np.asarray(req.image)
    assert (got[alpha == 0] == (255, 255, 255)).all()  # was (0, 0, 0, 0): black without compositing
    assert (got[alpha == 255] == (255, 0, 0)).all()
    assert req.notes == ("image: its transparent areas (RGBA) were composited on white, as AUTOMATIC1111 does",)


def half_transparent(mode: str) -> Image.Image:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 128))
    if mode == "LA":
        return Image.new("LA", (64, 64), (0, 128))
    if mode == "PA":
        return rgba.convert("PA")
    return rgba


@pytest.mark.parametrize("mode,expected", [("RGBA", (255, 127, 127)), ("LA", (127, 127, 127)),
                                           ("PA", (255, 127, 127))])
def test_partial_alpha_blends_over_white(mode, expected):
    req = validate_request({**IMG2IMG, "image": half_transparent(mode)})
    assert np.abs(np.asarray(req.image).astype(int) - expected).max() <= 1  # a/255 blend, rounded
    assert f"transparent areas ({mode})" in req.notes[0]


@pytest.mark.parametrize("fmt,mode", [("GIF", "P"), ("PNG", "RGB"), ("PNG", "L")])
def test_colour_key_transparency_is_composited_too(tmp_path, fmt, mode):
    image = Image.new(mode, (64, 64), {"P": 0, "RGB": (0, 0, 0), "L": 0}[mode])
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste({"P": 1, "RGB": (255, 0, 0), "L": 200}[mode], (0, 0, 32, 64))
    path = tmp_path / f"key.{fmt.lower()}"
    image.save(path, fmt, transparency={"P": 0, "RGB": (0, 0, 0), "L": 0}[mode])
    got = np.asarray(validate_request({**IMG2IMG, "image": str(path)}).image)
    assert (got[:, 32:] == 255).all()  # the keyed colour, black, is transparent
    assert tuple(got[0, 0]) == {"P": (255, 0, 0), "RGB": (255, 0, 0), "L": (200, 200, 200)}[mode]


def test_opaque_rgba_is_converted_without_a_compositing_note():
    req = validate_request({**IMG2IMG, "image": Image.new("RGBA", (64, 64), (10, 20, 30, 255))})
    assert req.notes == ("image: converted from RGBA to RGB",) and req.image.getpixel((0, 0)) == (10, 20, 30)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    req = validate_request({**IMG2IMG, "image": str(tmp_path / "phone.jpg"), "height": 128})
    got = np.asarray(req.image).astype(int)
    assert got[10, 32, 0] > 200 and got[118, 32, 0] < 60  # red now on top, upright
    assert "image: turned upright as its EXIF orientation (6) asks" in req.notes


def test_animation_gives_its_first_frame_with_a_note(tmp_path):
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    for name in ("anim.gif", "anim.png"):
        req = validate_request({**IMG2IMG, "image": str(tmp_path / name)})
        assert req.image.getpixel((5, 5)) == (255, 0, 0)
        assert "image: holds several frames; the first was used" in req.notes


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """9000x9000 grey, 79 kB on disk, 81 MB decoded: the report's decompression bomb."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (9000, 9000)).save(path)
    return str(path)


@pytest.fixture
def decoded(monkeypatch):
    """The sizes of every image Pillow decodes while the test runs."""
    from PIL import ImageFile

    sizes = []
    original = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


@pytest.mark.parametrize("field", ["image", "depth_map"])
def test_huge_image_is_refused_from_its_header(huge_png, decoded, field):
    message = check(field, **{**DEPTH, field: huge_png})
    assert message == f"{field}: is 9000x9000 (81 megapixels); the largest accepted is 40 megapixels"
    assert (9000, 9000) not in decoded
    validate_request({**IMG2IMG, "image": str(CASES / "gray16.png")})
    assert set(decoded) == {(64, 64)}  # the recorder sees what is decoded


def test_image_beyond_pillows_own_limit_is_refused_by_size(tmp_path, decoded):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 megapixels of 8-bit grey
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    assert check("image", **{**IMG2IMG, "image": str(tmp_path / "bomb.png")}) == (
        "image: is over 178 megapixels; the largest accepted is 40 megapixels")
    assert decoded == []


def test_truncated_and_foreign_files_say_why(tmp_path):
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    assert check("image", **{**IMG2IMG, "image": str(tmp_path / "cut.png")}).startswith(
        "image: is not a readable image: decoding failed (image file is truncated")
    (tmp_path / "drawing.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n")
    assert check("image", **{**IMG2IMG, "image": str(tmp_path / "drawing.eps")}) == (
        "image: is not a readable image: not a PNG, JPEG, WEBP, GIF, BMP, TIFF file")  # EPS would run Ghostscript
    assert check("image", **{**IMG2IMG, "image": str(tmp_path / "missing.png")}) == (
        "image: is not a readable image (No such file or directory)")


def test_array_that_is_no_image_is_refused():
    message = check("image", **{**IMG2IMG, "image": np.zeros((64, 64, 3), np.float64)})
    assert message == ("image: is an array of shape (64, 64, 3) and dtype float64, which is not an image; "
                       "use uint8 (H, W) or (H, W, 3)")


def test_depth_map_notes_alpha_and_colour():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 32, 64))
    req = validate_request({**DEPTH, "depth_map": rgba})
    assert req.notes == ("depth_map: its alpha channel (RGBA) was ignored",)
    assert req.depth_map[0, 0] == 255 and req.depth_map[0, -1] == 0
    req = validate_request({**DEPTH, "depth_map": rgba.resize((50, 30))})
    assert req.notes[-1] == "depth_map: resized from 50x30 to 64x64" and req.depth_map.shape == (30, 50)
    colour = Image.new("RGB", (64, 64), (0, 0, 255))
    colour.paste((255, 0, 0), (0, 0, 32, 64))
    req = validate_request({**DEPTH, "depth_map": colour})
    assert req.notes == ("depth_map: is in colour; its brightness (luminance) was taken as depth",)


# -- parameter combinations --------------------------------------------------------------------

@pytest.mark.parametrize("mode,steps,strength,message", [
    ("img2img", 1, 0.75, "1 steps at strength 0.75 run no step: img2img runs int(steps × strength) = int(0.75) = 0 "
                         "of them; raise steps to 2 or strength to 1.0"),
    ("depth2img", 20, 0.04, "20 steps at strength 0.04 run no step: depth2img runs int(steps × strength) = "
                            "int(0.8) = 0 of them; raise steps to 25 or strength to 0.05"),
    ("img2img", 3, 0.33, "3 steps at strength 0.33 run no step: img2img runs int(steps × strength) = int(0.99) = 0 "
                         "of them; raise steps to 4 or strength to 0.34"),
    # 49 * (1 / 49) is 0.9999999999999999 in floating point, and diffusers truncates it to 0 too
    ("img2img", 49, 1 / 49, "49 steps at strength 0.02040816326530612 run no step: img2img runs int(steps × "
                            "strength) = int(1) = 0 of them; raise steps to 50 or strength to 0.03"),
    ("img2img", 100, 0.001, "100 steps at strength 0.001 run no step: img2img runs int(steps × strength) = int(0.1) "
                            "= 0 of them; raise strength to 0.01 (at strength 0.001 even 150 steps run none)"),
])
def test_strength_that_leaves_no_step_is_refused(mode, steps, strength, message):
    image = Image.new("RGB", (64, 64))
    assert check("strength", mode=mode, image=image, steps=steps, strength=strength) == f"strength: {message}"


@pytest.mark.parametrize("steps,strength,suggested", [(1, 0.75, [(2, 0.75), (1, 1.0)]),
                                                      (20, 0.04, [(25, 0.04), (20, 0.05)]),
                                                      (3, 0.33, [(4, 0.33), (3, 0.34)]),
                                                      (49, 1 / 49, [(50, 1 / 49), (49, 0.03)])])
def test_the_suggested_values_are_the_smallest_that_work(steps, strength, suggested):
    image = Image.new("RGB", (64, 64))
    for ok_steps, ok_strength in suggested:
        req = validate_request({**IMG2IMG, "image": image, "steps": ok_steps, "strength": ok_strength})
        assert req.denoising_steps == 1
    for low_steps, low_strength in [(suggested[0][0] - 1, strength), (steps, round(suggested[1][1] - 0.01, 2))]:
        check("strength", **{**IMG2IMG, "image": image, "steps": low_steps, "strength": low_strength})


@pytest.mark.parametrize("mode,steps,strength,runs", [("txt2img", 20, 0.75, 20), ("img2img", 20, 0.75, 15),
                                                      ("depth2img", 10, 0.3, 3), ("img2img", 100, 0.29, 28),
                                                      ("img2img", 7, 1.0, 7)])
def test_denoising_steps_is_what_diffusers_runs(make_request, cache, tiny_dir, mode, steps, strength, runs):
    from pipelines import Frame, generate

    req = make_request(mode, steps=steps, strength=strength, scheduler="DDIM")
    assert req.denoising_steps == runs  # 100 * 0.29 is 28.999999999999996: int() gives 28, in diffusers too
    if steps <= 20:  # the long one is float arithmetic only
        frames = [f for f in generate(req, cache, source=str(tiny_dir)) if isinstance(f, Frame)]
        assert len(frames) == runs and frames[-1].total == runs


@pytest.mark.parametrize("field", ["seed", "steps", "width", "height"])
@pytest.mark.parametrize("value", [1.5, 64.5, np.float32(72.25)])
def test_every_integer_field_refuses_fractions(field, value):
    assert check(field, **{field: value}) == f"{field}: must be a whole number, got {float(value)}"


@pytest.mark.parametrize("field", ["seed", "steps", "width", "guidance_scale", "strength"])
def test_booleans_are_not_numbers(field):
    raw = {**IMG2IMG, "image": Image.new("RGB", (64, 64)), field: True}
    assert check(field, **raw) == f"{field}: must be a number, got True"


def test_whole_floats_are_taken_as_integers():
    req = validate_request({**BASE, "seed": 7.0, "steps": 4.0, "width": 64.0})
    assert (req.seed, req.steps, req.width) == (7, 4, 64) and isinstance(req.seed, int)


def test_gradio_number_hands_fractions_over_unrounded():
    from ui.fields import Number

    seed = Number(label="Seed", precision=0, minimum=-1, maximum=2**32 - 1)
    assert seed.preprocess(1.5) == 1.5  # gr.Number(precision=0) gives 2
    assert seed.preprocess(7) == 7 and seed.preprocess(None) is None
    with pytest.raises(Exception, match="Seed: Value -5 is less than minimum value -1"):
        seed.preprocess(-5)


def test_gradio_image_input_hands_over_the_file_as_sent(tmp_path):
    import base64

    from gradio.data_classes import ImageData

    from ui.fields import ImageFile

    field = ImageFile(label="Depth map", type="filepath", sources=["upload"])
    sent = (CASES / "depth16.png").read_bytes()
    assert field.preprocess(ImageData(path=str(CASES / "depth16.png"))) == str(CASES / "depth16.png")
    pasted = ImageData(url="data:image/png;base64," + base64.b64encode(sent).decode())
    assert Path(field.preprocess(pasted)).read_bytes() == sent  # gr.Image would re-encode it as 8-bit RGB
    assert field.preprocess(None) is None
    config = field.get_config()  # what the browser builds the widget from
    assert (config["label"], config["sources"], field.get_block_name()) == ("Depth map", ["upload"], "image")


def test_negative_prompt_without_guidance_is_noted_and_not_written():
    from pipelines.metadata import a1111_parameters

    req = validate_request({**BASE, "negative_prompt": "blurry", "guidance_scale": 1.0})
    assert not req.classifier_free_guidance
    assert req.notes == ("negative_prompt: not used: guidance_scale 1.0 turns classifier-free guidance off "
                         "(diffusers guides only above 1); raise guidance_scale above 1 to use it",)
    assert a1111_parameters(req, "m") == ("a red circle\nSteps: 10, Sampler: Euler, CFG scale: 1.0, Seed: 1, "
                                          "Size: 64x64, Model: m")
    guided = validate_request({**BASE, "negative_prompt": "blurry", "guidance_scale": 1.5})
    assert guided.notes == () and "\nNegative prompt: blurry\n" in a1111_parameters(guided, "m")


def test_guidance_below_one_acts_as_one():
    from pipelines.metadata import a1111_parameters

    req = validate_request({**BASE, "guidance_scale": 0.0})
    assert req.notes == ("guidance_scale: 0.0 acts as 1: diffusers turns classifier-free guidance off at 1 or below "
                         "and follows the prompt alone",)
    assert "CFG scale: 1.0," in a1111_parameters(req, "m")


def test_without_guidance_the_negative_prompt_and_scale_change_nothing(make_request, cache, tiny_dir):
    from pipelines import Final, generate

    def final(**changes):
        out = [o for o in generate(make_request(steps=2, **changes), cache, source=str(tiny_dir))]
        return np.asarray(out[-1].image) if isinstance(out[-1], Final) else None

    plain = final(guidance_scale=1.0)
    assert np.array_equal(final(guidance_scale=1.0, negative_prompt="blue, blurry"), plain)
    assert np.array_equal(final(guidance_scale=0.0, negative_prompt="blue"), plain)
    assert not np.array_equal(final(guidance_scale=1.5, negative_prompt="blue"), final(guidance_scale=1.5))


def test_info_line_shows_the_steps_that_run():
    from pipelines import Final
    from ui.events import _info

    def info(**changes):
        req = validate_request({**IMG2IMG, "image": Image.new("RGB", (64, 64)), **changes})
        return _info(req, "micro", Final(req.image, req, "micro", 1.234))

    assert info(steps=20, strength=0.75) == ("**img2img** · seed `1` · 15 of 20 steps (strength 0.75) · Euler · "
                                             "CFG 7.5 · 64x64 · micro · 1.23 s")
    assert "· 20 steps · Euler · CFG 1.0 (off: 1 or below) ·" in info(mode="txt2img", steps=20, guidance_scale=1)
