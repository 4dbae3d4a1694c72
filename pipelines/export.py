"""A run's steps as files to keep: animated GIF and WebP (Pillow), MP4 (PyAV,
H.264), a zip of PNGs, and the run's tensors as one `.safetensors` file."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import av
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

FORMATS = ("gif", "webp", "mp4", "zip")
FPS = 8
MIN_ANIMATION_SIDE = 256  # the page shows frames at about this size; a 16 px latent-rgb GIF is unwatchable


def export(frames: list[Image.Image], path: str | Path, fps: int = FPS) -> Path:
    """Write `frames` (one per step, in order) to `path`; the suffix picks the format.

    Animations (GIF, WebP, MP4) scale frames up by a whole factor, nearest neighbour, until the
    short side is at least MIN_ANIMATION_SIDE, as the page shows them; the PNG zip keeps each
    frame's own pixels. Raises ValueError for an unknown suffix or no frames."""
    path = Path(path)
    kind = path.suffix.lstrip(".")
    if kind not in FORMATS:
        raise ValueError(f"unknown export format {kind!r}; choose one of {', '.join(FORMATS)}")
    if not frames:
        raise ValueError("nothing to export: the run has no steps yet")
    frames = [f.convert("RGB") for f in frames]
    if kind != "zip":
        frames = _upscaled(frames)
    if kind in ("gif", "webp"):
        extra = {"lossless": True} if kind == "webp" else {"disposal": 1}
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0, **extra)
    elif kind == "mp4":
        _mp4(frames, path, fps)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            for n, frame in enumerate(frames, 1):
                buffer = io.BytesIO()
                frame.save(buffer, "PNG")
                archive.writestr(f"step_{n:04d}.png", buffer.getvalue())
    return path


def _upscaled(frames: list[Image.Image]) -> list[Image.Image]:
    width, height = frames[0].size
    scale = max(1, -(-MIN_ANIMATION_SIDE // min(width, height)))
    if scale == 1:
        return frames
    return [f.resize((width * scale, height * scale), Image.Resampling.NEAREST) for f in frames]


def _mp4(frames: list[Image.Image], path: Path, fps: int) -> None:
    # H.264 wants even sides
    width, height = frames[0].size
    size = (width + width % 2, height + height % 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            image = frame.resize(size, Image.Resampling.NEAREST)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def save_run_tensors(frames: list, path: str | Path, metadata: dict | None = None) -> Path:
    """Write one run's tensors inside the denoiser to `path` (safetensors, opened with
    `safetensors.torch.load_file` or `safe_open`). N steps, C latent channels, an (h, w)
    latent grid (Flux's unpacked), T prompt tokens; float32 unless said:

    - `latents` [N+1, C, h, w]: the latents the run started from, then x_t after each step,
      in the variance-preserving form the denoiser reads (Euler's sigma-scaled latents
      divided by sqrt(sigma^2 + 1)); `latents[i]` is what step i + 1 denoised
    - `x0` [N, C, h, w]: each step's clean-latent estimate
    - `noise_pred` [N, C, h, w]: what the scheduler received (epsilon, v, or flow velocity)
    - `noise_pred_text`, `noise_pred_uncond` [N, C, h, w]: the denoiser's two predictions,
      when the run used classifier-free guidance
    - `timesteps` [N]: the timestep of each step; `noise_level` [N]: the share of noise in
      `latents[i]` (sqrt(1 - alpha_bar), or sigma for flow matching)
    - `attention` [N, T, h, w] float16: when recorded, each prompt token's cross-attention map

    `frames` are `generate.Frame`s, in order, from the first step; `metadata` (JSON-able values)
    is stored as JSON strings beside `tokens` (the T token texts). Raises ValueError with no frames."""
    if not frames:
        raise ValueError("nothing to save: the run has no steps yet")
    first = frames[0]

    def stack(name: str):
        return np.concatenate([_array(getattr(f, name)) for f in frames])

    tensors = {
        "latents": np.concatenate([_array(first.start_latents), stack("latents")]),
        "x0": stack("x0"),
        "noise_pred": stack("noise_pred"),
        "timesteps": np.array([f.timestep for f in frames], dtype=np.float32),
        "noise_level": np.array(first.schedule_levels()[: len(frames)], dtype=np.float32),
    }
    if first.noise_pred_text is not None:
        tensors |= {"noise_pred_text": stack("noise_pred_text"), "noise_pred_uncond": stack("noise_pred_uncond")}
    if first.attention is not None:
        tensors["attention"] = np.stack([_array(f.attention, np.float16) for f in frames])
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    save_file(tensors, str(path), metadata={**meta, "tokens": json.dumps(list(first.tokens))})
    return Path(path)


def _array(copy, dtype=np.float32) -> np.ndarray:
    # through float32: numpy has no bfloat16 (Flux and SD 3 on CUDA)
    return copy.tensor().float().numpy().astype(dtype)
