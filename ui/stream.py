"""From frames to what the browser gets, at O(1) server cost per step.

Each frame is encoded once, to a small JPEG in this run's folder inside Gradio's
cache (files there are served as they are, never copied or re-encoded), and is
referred to by path from then on. The preview updates every step. The gallery is
the one output whose server cost grows with the run (Gradio postprocesses every
item on each update), so it is refreshed only when it has grown by a quarter
since its last refresh, and once more at the end: at most 5N items are processed
in a run of N steps, a constant cost per step.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

GALLERY_GROWTH = 1.25  # refresh the gallery when it is this many times the size last sent
FRAME_FORMAT, FRAME_QUALITY = "JPEG", 85


class RunStore:
    """Folders for runs' frames; keeps the newest `keep` runs, deletes older ones."""

    def __init__(self, root: str | Path, keep: int = 32):
        self.root = Path(root)
        self.keep = keep
        self._lock = threading.Lock()
        self._counter = itertools.count()

    def new_run(self) -> Path:
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            # name sorts by creation: time, then a per-process counter, then randomness
            folder = self.root / f"{time.time_ns():020d}-{next(self._counter):06d}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
            for old in sorted(p for p in self.root.iterdir() if p.is_dir())[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            return folder


@dataclass
class RunView:
    """What the browser shows of one run so far, and its frames for the timeline."""

    folder: Path
    request: object = None  # the GenerationRequest
    frames: list = field(default_factory=list)
    levels: list[float] = field(default_factory=list)  # noise level of x_t at the start and after every step
    final: str | None = None
    gallery: list[tuple[str, str]] = field(default_factory=list)  # (path, caption), one per step
    preview: str | None = None
    depth: str | None = None
    step: int = 0
    total: int = 0
    _gallery_sent: int = 0

    @property
    def label(self) -> str:
        r = self.request
        return f"#{self.folder.name[-8:]} · {r.mode} · seed {r.seed} · {r.steps} steps · CFG {r.guidance_scale}"

    def add_frame(self, frame) -> None:
        self.frames.append(frame)
        if frame.schedule_t is not None:
            self.levels = frame.schedule_levels()
        path = self.save(frame.image, f"step_{frame.step:04d}.jpg")
        self.gallery.append((path, frame.caption))
        self.preview, self.step, self.total = path, frame.step, frame.total
        if frame.depth is not None:
            self.depth = self.save(frame.depth, "depth.png")

    def save(self, image: Image.Image, name: str) -> str:
        path = self.folder / name
        if name.endswith(".jpg"):
            image.save(path, FRAME_FORMAT, quality=FRAME_QUALITY)
        else:
            image.save(path)
        return str(path)

    def gallery_due(self) -> bool:
        """True when the gallery has grown enough to be worth sending again."""
        if len(self.gallery) >= max(self._gallery_sent + 1, self._gallery_sent * GALLERY_GROWTH):
            self._gallery_sent = len(self.gallery)
            return True
        return False


def progress_html(step: int, total: int, note: str = "", levels: list[float] | None = None) -> str:
    pct = 100 * step / total if total else 0
    plot = schedule_svg(levels, step) if levels else ""
    return (
        f'<div class="sw-progress"><progress max="{total}" value="{step}"></progress>'
        f"<span>step {step}/{total} ({pct:.0f}%) {note}</span></div>{plot}"
    )


def schedule_svg(levels: list[float], current: int, width: int = 480, height: int = 120) -> str:
    """The noise level sqrt(1 - alpha_bar) of x_t at the start (levels[0]) and after each step
    as a line plot, step `current` marked."""
    pad, n = 28, len(levels) - 1
    x = [pad + (width - 2 * pad) * i / max(n, 1) for i in range(n + 1)]
    y = [height - pad - (height - 2 * pad) * level for level in levels]
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    marker = ""
    if 0 <= current <= n:
        cx, cy = x[current], y[current]
        marker = (f'<line x1="{cx:.1f}" y1="{pad}" x2="{cx:.1f}" y2="{height - pad}" class="now"/>'
                  f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" class="now"/>')
    return (
        f'<svg class="sw-schedule" viewBox="0 0 {width} {height}" role="img" aria-label="noise schedule">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>'
        f'<text x="{pad}" y="{pad - 8}">noise level √(1−ᾱ)</text><text x="{pad - 18}" y="{pad + 4}">1</text>'
        f'<text x="{pad - 18}" y="{height - pad + 4}">0</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">step {n}</text>'
        f'<polyline points="{line}" class="curve"/>{marker}</svg>'
    )

