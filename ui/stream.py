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
    """What the browser shows of one run so far."""

    folder: Path
    gallery: list[tuple[str, str]] = field(default_factory=list)  # (path, caption), one per step
    preview: str | None = None
    depth: str | None = None
    step: int = 0
    total: int = 0
    _gallery_sent: int = 0

    def add_frame(self, frame) -> None:
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


def progress_html(step: int, total: int, note: str = "") -> str:
    pct = 100 * step / total if total else 0
    return (
        f'<div class="sw-progress"><progress max="{total}" value="{step}"></progress>'
        f"<span>step {step}/{total} ({pct:.0f}%) {note}</span></div>"
    )

