"""Generation settings inside the PNG, in AUTOMATIC1111's "parameters" text chunk,
which A1111, ComfyUI, InvokeAI and sd-parsers all read."""

from __future__ import annotations

from pathlib import Path

from PIL import PngImagePlugin

from .request import GenerationRequest


def a1111_parameters(req: GenerationRequest, model: str) -> str:
    fields = [
        ("Steps", req.steps),
        ("Sampler", req.scheduler),
        ("CFG scale", req.guidance_scale),
        ("Seed", req.seed),
        ("Size", f"{req.width}x{req.height}"),
        ("Model", model),
    ]
    if req.mode != "txt2img":
        fields.append(("Denoising strength", req.strength))
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def save_png(final, path: str | Path, model: str) -> str:
    """Write the final image losslessly with its settings; return the path."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(final.request, model))
    final.image.save(path, "PNG", pnginfo=info)
    return str(path)
