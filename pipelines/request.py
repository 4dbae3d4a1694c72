"""The one validated description of a run. Everything past `validate_request`
trusts its fields; bad input stops here with a message that names the field."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from .previews import PREVIEW_MODES, VIEWS
from .schedulers import SCHEDULER_NAMES

Mode = Literal["txt2img", "img2img", "depth2img"]
MODES: tuple[Mode, ...] = ("txt2img", "img2img", "depth2img")
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # documented coercion: -1 asks for a fresh random seed
MAX_INPUT_PIXELS = 40_000_000  # uploads larger than this are refused before decoding (decompression bombs)


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


@dataclass(frozen=True)
class GenerationRequest:
    mode: Mode
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = "Euler a"
    preview: str = "latent-rgb"
    view: str = "x_t"
    strength: float = 0.75
    image: Image.Image | None = field(default=None, repr=False)
    depth_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32
    notes: tuple[str, ...] = ()  # documented coercions applied to the inputs, to tell the user

    def settings(self) -> dict[str, Any]:
        """The plain-data settings of this run (no images), for captions and metadata."""
        keys = ["mode", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler"]
        if self.mode != "txt2img":
            keys.append("strength")
        return {k: getattr(self, k) for k in keys}


def validate_request(raw: dict[str, Any], limits: Limits = Limits()) -> GenerationRequest:
    """Check and normalise raw values (from Gradio, gradio_client or Python)."""
    mode = _choice(raw, "mode", MODES)
    prompt = _text(raw, "prompt", limits)
    req = dict(
        mode=mode,
        prompt=prompt,
        negative_prompt=_text(raw, "negative_prompt", limits, default=""),
        seed=_seed(raw.get("seed", RANDOM_SEED)),
        steps=_int(raw, "steps", limits.min_steps, limits.max_steps, default=20),
        guidance_scale=_float(raw, "guidance_scale", 0.0, limits.max_guidance, default=7.5),
        width=_side(raw, "width", limits),
        height=_side(raw, "height", limits),
        scheduler=_choice(raw, "scheduler", SCHEDULER_NAMES, default="Euler a"),
        preview=_choice(raw, "preview", limits.preview_modes, default="latent-rgb"),
        view=_choice(raw, "view", VIEWS, default="x_t"),
    )
    if req["width"] * req["height"] > limits.max_pixels:
        raise RequestError(
            "width",
            f"{req['width']}x{req['height']} is more than this server's budget of {limits.max_pixels} pixels; "
            "lower width or height",
        )
    if mode != "txt2img":
        req["strength"] = _float(raw, "strength", 0.0, 1.0, default=0.75, low_open=True)
        req["image"], notes = _image(raw.get("image"), "image", (req["width"], req["height"]))
        req["notes"] = tuple(notes)
    if mode == "depth2img" and raw.get("depth_map") is not None:
        req["depth_map"] = _depth_map(raw["depth_map"])
    return GenerationRequest(**req)


def _number(raw: dict, name: str, default) -> float:
    value = raw.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
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


def _side(raw: dict, name: str, limits: Limits) -> int:
    value = _int(raw, name, limits.min_side, limits.max_side, default=512)
    if value % 8:
        raise RequestError(name, f"must be a multiple of 8 (the VAE works on 8-pixel blocks), got {value}")
    return value


def _seed(value) -> int:
    seed = _int({"seed": value}, "seed", RANDOM_SEED, MAX_SEED, default=RANDOM_SEED)
    return random.randint(0, MAX_SEED) if seed == RANDOM_SEED else seed


def _choice(raw: dict, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    value = raw.get(name) or default
    if value not in allowed:
        raise RequestError(name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
    return value


def _text(raw: dict, name: str, limits: Limits, default: str | None = None) -> str:
    value = raw.get(name, default)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(name, f"must be text, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(name, f"is {len(value)} characters long; the limit is {limits.max_prompt_chars}")
    return value


def _open(value, name: str):
    """Paths (Gradio uploads, scripts) become images; a bad file is the field's error."""
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as image:
                _check_pixels(image, name)  # before decoding: a small file can hold a huge image
                image.load()
                return image
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise RequestError(name, f"is not a readable image ({err})") from None
    if isinstance(value, Image.Image):
        _check_pixels(value, name)
    return value


def _check_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise RequestError(name, f"is {width}x{height}; the largest accepted is {MAX_INPUT_PIXELS // 10**6} megapixels")


def _image(value, name: str, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """The input image as RGB at the requested size, and what was changed to get there."""
    if value is None:
        raise RequestError(name, "is required for this mode; upload an image")
    value = _open(value, name)
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise RequestError(name, f"must be an image, got {type(value).__name__}")
    notes = []
    if value.mode != "RGB":
        notes.append(f"{name}: converted from {value.mode} to RGB")
    image = ImageOps.exif_transpose(value).convert("RGB")
    if image.size != size:
        # output size follows the width/height controls, as in other web UIs
        notes.append(f"{name}: resized from {image.width}x{image.height} to {size[0]}x{size[1]}")
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image, notes


def _depth_map(value) -> np.ndarray:
    value = _open(value, "depth_map")
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("F") if value.mode not in ("I;16", "I", "F") else value, dtype=np.float32)
    if not isinstance(value, np.ndarray):
        raise RequestError("depth_map", f"must be an image or array, got {type(value).__name__}")
    depth = np.array(value, dtype=np.float32)  # a writable copy, as torch.from_numpy wants
    if depth.ndim == 3:
        depth = depth.mean(axis=2)  # an RGB rendering of a grey depth map
    if depth.ndim != 2:
        raise RequestError("depth_map", f"must be a 2-D map, got shape {value.shape}")
    if not np.isfinite(depth).all():
        raise RequestError("depth_map", "holds NaN or infinite values")
    if depth.max() == depth.min():
        raise RequestError("depth_map", "is flat (one value everywhere); it must show what is near and far")
    return depth
