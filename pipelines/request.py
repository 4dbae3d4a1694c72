"""The one validated description of a run. Everything past `validate_request`
trusts its fields; bad input stops here with a message that names the field."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .choices import PREVIEW_MODES, SCHEDULER_NAMES, VIEWS

Mode = Literal["txt2img", "img2img", "depth2img"]
MODES: tuple[Mode, ...] = ("txt2img", "img2img", "depth2img")
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # documented coercion: -1 asks for a fresh random seed
MAX_INPUT_PIXELS = 40_000_000  # refused from the header, before decoding: a 99 KB PNG can hold 81 megapixels
# Pillow's readers for photos and renders (JPEG includes phones' multi-picture MPO); not EPS,
# which runs Ghostscript, nor the long tail of rare formats
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
BACKGROUND = (255, 255, 255, 255)  # under transparent areas; AUTOMATIC1111's img2img_background_color default
_WIDE_MODES = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float"}  # grey pixels wider than 8 bits, as Pillow opens them


class RequestError(ValueError):
    """A request field is out of bounds; `field` names it, the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What this server accepts; set from the device and memory budget at start-up."""

    min_steps: int = 1
    max_steps: int = 150
    max_guidance: float = 30.0
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 1024 * 1024
    max_prompt_chars: int = 2000
    preview_modes: tuple[str, ...] = PREVIEW_MODES
    views: tuple[str, ...] = VIEWS
    schedulers: tuple[str, ...] = SCHEDULER_NAMES  # the menu (txt2img's)
    # mode -> {scheduler left out for this model: why}, from `schedulers.scheduler_menu`
    unfit_schedulers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # from the loaded model's `Family`
    size_multiple: int = 8  # width and height in blocks of this many pixels
    modes: tuple[str, ...] = ("txt2img", "img2img", "depth2img")  # what it runs
    unavailable_modes: Mapping[str, str] = field(default_factory=dict)  # each other mode: what to pass instead
    negative_prompt: bool = True  # False: the model has no negative conditioning (Flux)
    distilled_guidance: bool = False  # True: guidance_scale is an input of the model, not CFG (Flux)
    guidance_ignored: bool = False  # True: the model takes no guidance at all (FLUX.1-schnell)
    family: str = "SD 1.x/2.x"  # its label, for messages


def _field(default, kind: str, label: str, **spec) -> Any:
    """A run field with its `RunField` spec as dataclass metadata."""
    return field(default=default, repr=kind != "image", metadata={"run": dict(kind=kind, label=label, **spec)})


@dataclass(frozen=True)
class RunField:
    """How one run field is checked, set and shown: `FIELDS`, read from GenerationRequest."""

    name: str
    default: Any  # what validate_request takes when the field is left out
    kind: str  # text, int, float, bool, choice or image: the control that sets it
    label: str  # the control's label, which Gradio's own range messages name
    low: float | str | None = None  # bounds: a number, or the Limits attribute that holds it
    high: float | str | None = None
    choices: str | None = None  # the Limits attribute listing the allowed values
    modes: tuple[str, ...] = MODES  # the modes that take it
    stored: bool = True  # in settings(): captions and PNG metadata

    def bounds(self, limits: Limits) -> tuple:
        """(low, high) for a number, with `limits`' values for the bounds it names."""
        return tuple(getattr(limits, b) if isinstance(b, str) else b for b in (self.low, self.high))


@dataclass(frozen=True)
class GenerationRequest:
    """A validated run. Its fields past `mode`, in this order, are every mode's API parameters
    (gradio_client's positional order); each one's metadata declares how it is checked and set."""

    mode: Mode
    prompt: str = _field("", "text", "Prompt")
    negative_prompt: str = _field("", "text", "Negative prompt")
    seed: int = _field(0, "int", "Seed (-1 = random)", low=RANDOM_SEED, high=MAX_SEED)  # left out: random
    steps: int = _field(20, "int", "Steps", low="min_steps", high="max_steps")
    guidance_scale: float = _field(7.5, "float", "Guidance scale (CFG)", low=0.0, high="max_guidance")
    width: int = _field(512, "int", "Width", low="min_side", high="max_side")
    height: int = _field(512, "int", "Height", low="min_side", high="max_side")
    scheduler: str = _field("Euler a", "choice", "Scheduler", choices="schedulers")
    preview: str = _field("latent-rgb", "choice", "Preview decoder", choices="preview_modes", stored=False)
    view: str = _field("x_t", "choice", "View", choices="views", stored=False)
    # 8-bit RGB, width x height
    image: Image.Image | None = _field(None, "image", "Input image", modes=MODES[1:], stored=False)
    strength: float = _field(0.75, "float", "Strength", low=0.0, high=1.0, modes=MODES[1:])  # low bound open
    # (H, W) float32 at the map's own range
    depth_map: np.ndarray | None = _field(None, "image", "Depth map", modes=MODES[2:], stored=False)
    # costs memory and time (BENCHMARKS.md); never changes the image
    record_attention: bool = _field(False, "bool", "Record attention maps", stored=False)
    notes: tuple[str, ...] = ()  # documented coercions applied to the inputs, to tell the user

    @property
    def denoising_steps(self) -> int:
        """The denoising steps that actually run. img2img and depth2img start from the input
        image noised to `strength` and run only the last int(steps * strength) of the `steps`
        schedule (diffusers' `get_timesteps`: init_timestep = min(int(steps * strength), steps))."""
        if self.mode == "txt2img":
            return self.steps
        return min(int(self.steps * self.strength), self.steps)

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the run guides. diffusers does only when guidance_scale > 1
        (`do_classifier_free_guidance`); at or below 1 it follows the prompt alone, never
        encodes the negative prompt, and every such guidance_scale gives the same image."""
        return self.guidance_scale > 1

    def settings(self) -> dict[str, Any]:
        """The plain-data settings of this run (no images), for captions and metadata."""
        return {"mode": self.mode, **{f.name: getattr(self, f.name) for f in fields_of(self.mode) if f.stored}}


FIELDS: dict[str, RunField] = {f.name: RunField(f.name, f.default, **f.metadata["run"])
                               for f in dataclass_fields(GenerationRequest) if "run" in f.metadata}


def fields_of(mode: str) -> list[RunField]:
    """The fields `mode` takes, in API order."""
    return [f for f in FIELDS.values() if mode in f.modes]


def validate_request(raw: dict[str, Any], limits: Limits = Limits()) -> GenerationRequest:
    """Check and normalise raw values (from Gradio, gradio_client or Python) against `FIELDS`.

    Images come as paths (uploads, as sent), PIL images or arrays and are decoded here, once.
    What had to be changed to run (a resize, a conversion) or has no effect (a negative prompt
    without guidance) is kept in `notes` for the user. Raises RequestError naming the field."""
    mode = _choice(raw, "mode", MODES)
    if mode not in limits.modes:
        hint = limits.unavailable_modes.get(mode)
        raise RequestError("mode", f"{mode} is not available with this {limits.family} model; it runs "
                                   f"{', '.join(limits.modes)}" + (f": {hint}" if hint else ""))
    req: dict[str, Any] = {"mode": mode}
    for f in fields_of(mode):
        if f.kind != "image":
            req[f.name] = _CHECKS.get(f.name, _CHECKS[f.kind])(raw, f, mode, limits)
    if req["width"] * req["height"] > limits.max_pixels:
        raise RequestError(
            "width",
            f"{req['width']}x{req['height']} is more than this server's budget of {limits.max_pixels} pixels; "
            "lower width or height",
        )
    notes = []
    if mode != "txt2img":
        _check_denoising_steps(mode, req["steps"], req["strength"], limits)
        req["image"] = _image(raw.get("image"), "image", (req["width"], req["height"]), notes)
    if mode == "depth2img" and raw.get("depth_map") is not None:
        req["depth_map"] = _depth_map(raw["depth_map"], notes)
        height, width = req["depth_map"].shape
        if (width, height) != (req["width"], req["height"]):  # the pipeline interpolates it to the latents
            notes.append(f"depth_map: resized from {width}x{height} to {req['width']}x{req['height']}")
    if not limits.negative_prompt:
        if req["negative_prompt"]:
            notes.append(f"negative_prompt: not used: {limits.family} has no negative conditioning "
                         "(its guidance is distilled into the model)")
            req["negative_prompt"] = ""
        if limits.guidance_ignored and req["guidance_scale"]:
            notes.append(f"guidance_scale: not used: this {limits.family} model takes no guidance (FLUX.1-schnell "
                         "is distilled to run without it)")
    elif req["guidance_scale"] <= 1 and req["negative_prompt"]:
        notes.append(f"negative_prompt: not used: guidance_scale {req['guidance_scale']} turns classifier-free "
                     "guidance off (diffusers guides only above 1); raise guidance_scale above 1 to use it")
    elif req["guidance_scale"] < 1:
        notes.append(f"guidance_scale: {req['guidance_scale']} acts as 1: diffusers turns classifier-free guidance "
                     "off at 1 or below and follows the prompt alone")
    return GenerationRequest(**req, notes=tuple(notes))


def _check_denoising_steps(mode: str, steps: int, strength: float, limits: Limits) -> None:
    """Refuse what would run no step: diffusers would fail inside the pipeline."""
    if int(steps * strength) >= 1:  # the expression diffusers evaluates, float rounding included
        return
    fewest_steps = next((n for n in range(steps, limits.max_steps + 1) if int(n * strength) >= 1), None)
    least_strength = next(s / 100 for s in range(1, 101) if int(steps * (s / 100)) >= 1)  # the slider's 0.01 grid
    fix = f"raise steps to {fewest_steps} or strength to {least_strength}" if fewest_steps else (
        f"raise strength to {least_strength} (at strength {strength} even {limits.max_steps} steps run none)")
    raise RequestError(
        "strength",
        f"{steps} steps at strength {strength} run no step: {mode} runs int(steps × strength) = "
        f"int({steps * strength:g}) = 0 of them; {fix}",
    )


def _number(raw: dict, name: str, default) -> float:
    value = raw.get(name, default)
    if value is None:
        value = default
    if isinstance(value, (bool, np.bool_)):
        raise RequestError(name, f"must be a number, got {value!r}")
    if not isinstance(value, (int, float, np.number)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RequestError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value}")
    return value


def _int(raw: dict, name: str, low: int, high: int, default: int) -> int:
    value = _number(raw, name, default)
    if value != int(value):
        raise RequestError(name, f"must be a whole number, got {value}")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {int(value)}")
    return int(value)


def _float(raw: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = float(_number(raw, name, default))
    if value > high or value < low or (low_open and value == low):
        bound = f"above {low}" if low_open else f"at least {low}"
        raise RequestError(name, f"must be {bound} and at most {high}, got {value}")
    return value


def _side(raw: dict, f: RunField, mode: str, limits: Limits) -> int:
    value = _int(raw, f.name, *f.bounds(limits), default=f.default)
    if value % limits.size_multiple:
        raise RequestError(f.name, f"must be a multiple of {limits.size_multiple} (the model works on "
                                   f"{limits.size_multiple}-pixel blocks), got {value}")
    return value


def _seed(raw: dict, f: RunField, mode: str, limits: Limits) -> int:
    seed = _int(raw, f.name, *f.bounds(limits), default=RANDOM_SEED)
    return random.randint(0, MAX_SEED) if seed == RANDOM_SEED else seed


def _scheduler(raw: dict, f: RunField, mode: str, limits: Limits) -> str:
    name = _choice(raw, f.name, SCHEDULER_NAMES, default=f.default)
    unfit = limits.unfit_schedulers.get(mode, {})
    if name in unfit:
        offered = [n for n in SCHEDULER_NAMES if n not in unfit]
        raise RequestError(f.name, f"{name} is not offered for this model in {mode}: {unfit[name]}; "
                                   f"choose one of {', '.join(offered)}")
    return name


def _choice(raw: dict, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    value = raw.get(name) or default
    if value not in allowed:
        raise RequestError(name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
    return value


def _bool(raw: dict, f: RunField, mode: str, limits: Limits) -> bool:
    value = raw.get(f.name, f.default)
    if value is None:
        return f.default
    if not isinstance(value, (bool, np.bool_)):  # 0 / "false" would be truthy guesses
        raise RequestError(f.name, f"must be true or false, got {value!r}")
    return bool(value)


def _text(raw: dict, f: RunField, mode: str, limits: Limits) -> str:
    value = raw.get(f.name, f.default)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f.name, f"must be text, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(f.name, f"is {len(value)} characters long; the limit is {limits.max_prompt_chars}")
    return value


# how each field is checked: by its kind, or by its name where it needs more
_CHECKS = {
    "text": _text,
    "bool": _bool,
    "int": lambda raw, f, mode, limits: _int(raw, f.name, *f.bounds(limits), default=f.default),
    # strength's low bound is open: at 0 img2img would run no step
    "float": lambda raw, f, mode, limits: _float(raw, f.name, *f.bounds(limits), default=f.default,
                                                 low_open=f.name == "strength"),
    "choice": lambda raw, f, mode, limits: _choice(raw, f.name, getattr(limits, f.choices), default=f.default),
    "seed": _seed, "width": _side, "height": _side, "scheduler": _scheduler,
}


def _decode(value, name: str, notes: list[str]) -> Image.Image:
    """Decode a path (a Gradio upload, a script's file), PIL image or array, once: the size is
    checked from the header before any pixel is decoded; animations give their first frame;
    EXIF orientation is applied. Returns the image in its own mode (Pillow's)."""
    if isinstance(value, np.ndarray):
        try:
            value = Image.fromarray(value)
        except TypeError:
            raise RequestError(name, f"is an array of shape {value.shape} and dtype {value.dtype}, which is not an "
                                     "image; use uint8 (H, W) or (H, W, 3)") from None
    if isinstance(value, (str, Path)):
        try:
            image = Image.open(value, formats=INPUT_FORMATS)  # lazy: reads the header only
        except Image.DecompressionBombError:
            raise RequestError(name, f"is over {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels; the largest "
                                     f"accepted is {MAX_INPUT_PIXELS // 10**6} megapixels") from None
        except UnidentifiedImageError:
            raise RequestError(name, f"is not a readable image: not a {', '.join(INPUT_FORMATS)} file") from None
        except OSError as err:
            raise RequestError(name, f"is not a readable image ({err.strerror or err})") from None
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise RequestError(name, f"must be an image, got {type(value).__name__}")
    try:
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise RequestError(name, f"is {width}x{height} ({width * height / 10**6:.0f} megapixels); the largest "
                                     f"accepted is {MAX_INPUT_PIXELS // 10**6} megapixels")
        try:
            animated = getattr(image, "is_animated", False)  # GIF, APNG, WebP, MPO: frame 0 stays current
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            upright = ImageOps.exif_transpose(image)  # decodes; a copy, detached from the file
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise RequestError(name, f"is not a readable image: decoding failed ({err})") from None
    finally:
        if image is not value:
            image.close()
    if animated:
        notes.append(f"{name}: holds several frames; the first was used")
    if orientation != 1:
        notes.append(f"{name}: turned upright as its EXIF orientation ({orientation}) asks")
    return upright


def _image(value, name: str, size: tuple[int, int], notes: list[str]) -> Image.Image:
    """The input image as 8-bit RGB at the requested size; what was changed is added to `notes`."""
    if value is None:
        raise RequestError(name, "is required for this mode; upload an image")
    image = _decode(value, name, notes)
    mode = image.mode
    if mode in _WIDE_MODES:
        image = _to_8_bit(image, name, notes)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            if rgba.getextrema()[3][0] < 255:
                notes.append(f"{name}: its transparent areas ({mode}) were composited on white, as AUTOMATIC1111 does")
            elif mode != "RGB":
                notes.append(f"{name}: converted from {mode} to RGB")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
        elif mode not in ("RGB", *_WIDE_MODES):
            notes.append(f"{name}: converted from {mode} to RGB")
        image = image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert (e.g. "La", from Python only)
        raise RequestError(name, f"has pixel mode {mode}, which cannot be made RGB ({err})") from None
    if image.size != size:
        # output size follows the width/height controls, as in other web UIs
        notes.append(f"{name}: resized from {image.width}x{image.height} to {size[0]}x{size[1]}")
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _to_8_bit(image: Image.Image, name: str, notes: list[str]) -> Image.Image:
    """Grey pixels wider than 8 bits as an 8-bit "L" image: 16-bit by the format's range
    (0..65535, so brightness is kept), 32-bit integer and float, which have no fixed
    range, by their own lowest..highest value. Pillow's convert would clip at 255."""
    values = np.asarray(image, dtype=np.float32)
    if not np.isfinite(values).all():
        raise RequestError(name, "holds NaN or infinite pixel values")
    low, high = (0.0, 65535.0) if image.mode.startswith("I;16") else (float(values.min()), float(values.max()))
    scale = 255 / (high - low) if high > low else 0.0
    pixels = np.clip(np.round((values - low) * scale), 0, 255).astype(np.uint8)
    notes.append(f"{name}: {_WIDE_MODES[image.mode]} grey ({image.mode}) scaled to 8 bits: "
                 f"{low:g}..{high:g} became 0..255")
    return Image.fromarray(pixels, "L")


def _depth_map(value, notes: list[str]) -> np.ndarray:
    """(H, W) float32 depth, near = larger, at the map's full range and precision: 16-bit and
    float maps keep every value (the pipeline rescales min..max to [-1, 1] itself)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        depth = np.array(value, dtype=np.float32)  # a writable copy, as torch.from_numpy wants
        if depth.ndim == 3:
            depth = depth.mean(axis=2)  # an RGB rendering of a grey depth map
    else:
        image = _decode(value, "depth_map", notes)
        if image.mode in _WIDE_MODES:
            depth = np.array(image, dtype=np.float32)
        else:
            if image.has_transparency_data:
                notes.append(f"depth_map: its alpha channel ({image.mode}) was ignored")
            rgb = image.convert("RGB")
            channels = np.asarray(rgb, dtype=np.int16)
            if np.abs(channels - channels[..., :1]).max() > 2:  # more than JPEG's wobble around grey
                notes.append("depth_map: is in colour; its brightness (luminance) was taken as depth")
            depth = np.array(rgb.convert("F"), dtype=np.float32)
    if depth.ndim != 2:
        raise RequestError("depth_map", f"must be a 2-D map, got shape {depth.shape}")
    if not np.isfinite(depth).all():
        raise RequestError("depth_map", "holds NaN or infinite values")
    if depth.max() == depth.min():
        raise RequestError("depth_map", "is flat (one value everywhere); it must show what is near and far")
    return depth
