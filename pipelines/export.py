"""A run's steps as files to keep: animated GIF and WebP (Pillow), MP4 (PyAV,
H.264), and a zip of PNGs."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

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
