"""Generation settings inside the PNG, in AUTOMATIC1111's "parameters" text chunk,
which A1111, ComfyUI, InvokeAI and sd-parsers all read."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import PngImagePlugin

from .request import GenerationRequest


def a1111_parameters(req: GenerationRequest, model: str) -> str:
    """The run's settings as AUTOMATIC1111's "parameters" text, true to what ran: without
    classifier-free guidance (guidance_scale <= 1) the negative prompt is not written, as
    it did not act, and CFG scale is 1, which every value at or below 1 acts as."""
    fields = [
        ("Steps", req.steps),
        ("Sampler", req.scheduler),
        ("CFG scale", req.guidance_scale if req.classifier_free_guidance else 1.0),
        ("Seed", req.seed),
        ("Size", f"{req.width}x{req.height}"),
        ("Model", model),
    ]
    if req.mode != "txt2img":
        fields.append(("Denoising strength", req.strength))
    lines = [req.prompt]
    if req.negative_prompt and req.classifier_free_guidance:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def read_parameters(image) -> dict:
    """Settings from an A1111 "parameters" text (or a PNG carrying one), as request fields."""
    text = image if isinstance(image, str) else getattr(image, "info", {}).get("parameters")
    if not text:
        raise ValueError("this image carries no generation settings (no 'parameters' text chunk)")
    lines = text.strip().split("\n")
    settings_line = lines[-1]
    prompt_lines, negative = lines[:-1], ""
    for n, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[len("Negative prompt:"):].strip(), *prompt_lines[n + 1:]])
            prompt_lines = prompt_lines[:n]
            break
    fields = dict(_split_settings(settings_line))
    out: dict = {"prompt": "\n".join(prompt_lines), "negative_prompt": negative}
    for key, name, cast in (("Steps", "steps", int), ("CFG scale", "guidance_scale", float), ("Seed", "seed", int),
                            ("Sampler", "scheduler", str), ("Denoising strength", "strength", float),
                            ("Model", "model", str)):
        if key in fields:
            out[name] = cast(fields[key])
    if "Size" in fields:
        out["width"], out["height"] = (int(v) for v in fields["Size"].split("x"))
    return out


def _split_settings(line: str):
    # "Steps: 20, Sampler: Euler a, Model: a, b" - values may hold commas, so split on ", Key: "
    parts = re.split(r", (?=[A-Z][\w ]*: )", line)
    for part in parts:
        key, _, value = part.partition(": ")
        yield key.strip(), value.strip()


def save_png(final, path: str | Path, model: str) -> str:
    """Write the final image losslessly with its settings; return the path."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(final.request, model))
    final.image.save(path, "PNG", pnginfo=info)
    return str(path)
