"""From frames to what the browser gets, at O(1) server cost per step.

Each frame is encoded once, to a small JPEG in this run's folder inside Gradio's
cache (files there are served as they are, never copied or re-encoded), and is
referred to by path from then on. The preview shows the newest step at each update (at most
ten a second: `ui.events.UPDATE_INTERVAL`). The gallery is
the one output whose server cost grows with the run (Gradio postprocesses every
item on each update), so it is refreshed only when it has doubled since its last
refresh, and once more at the end: under 3N items are processed in a run of N
steps, a constant cost per step.
"""

from __future__ import annotations

import bisect
import itertools
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

# refresh the gallery when it is this many times the size last sent: 2 rather than 1.25 took 0.14 s of the
# server's CPU off a 20-step bundled run, which the denoising thread waits for through the GIL (BENCHMARKS.md)
GALLERY_GROWTH = 2
FRAME_FORMAT, FRAME_QUALITY = "JPEG", 85


MB = 2**20


class RunStore:
    """Every run's step frames in memory and its files on disk, by run id, within fixed bounds.

    Memory holds what the Inspect timeline re-decodes: each run's frames (latents, x0,
    pixels) and its input images. It is bounded in all (`memory_runs` runs, `memory_bytes`)
    and per session (`session_bytes`, half by default); past a bound the least recently
    used run loses its frames (`RunView.dropped` says why; its files stay). Disk holds each
    run's folder (step JPEGs, final PNG, exports), at most `keep` folders and `disk_bytes`
    of step and final images (exports are not counted); as a run starts, the oldest
    folders past that are deleted and their runs forgotten. So a run leaves memory first
    and disk second, and a client that never comes back (`/gradio_api/call/` clients never
    close their session) costs nothing once its runs age out. Runs stream on worker
    threads while the panel reads on others; one lock guards the index and byte counts.
    """

    def __init__(self, root: str | Path, keep: int = 32, memory_runs: int = 16, memory_bytes: int = 1024 * MB,
                 session_bytes: int | None = None, disk_bytes: int = 4096 * MB):
        self.root = Path(root)
        self.keep, self.disk_bytes = keep, disk_bytes
        self.memory_runs, self.memory_bytes = memory_runs, memory_bytes
        self.session_bytes = session_bytes if session_bytes is not None else memory_bytes // 2
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._runs: dict[str, RunView] = {}  # on disk, oldest first
        self._memory: OrderedDict[str, RunView] = OrderedDict()  # frames in memory, least recently used first
        self.on_delete: Callable[[Path], None] | None = None  # told of each deleted folder

    def new_run(self, request=None, session: str | None = None) -> RunView:
        """A new run with its own folder; deletes the oldest folders past the disk bounds."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            # name sorts by creation: time, then a per-process counter, then randomness
            folder = self.root / f"{time.time_ns():020d}-{next(self._counter):06d}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
            view = RunView(folder, request=request, session=session)
            view.nbytes = held_bytes(request, view._seen) if request is not None else 0
            self._runs[view.id] = self._memory[view.id] = view
            # the disk, not the index: an earlier process's folders count too, and
            # another process on this root (or a person) may have deleted some of ours
            folders = sorted(p for p in self.root.iterdir() if p.is_dir())
            for gone in self._runs.keys() - {p.name for p in folders}:
                self._delete(self._runs[gone].folder)
            old = folders[: -self.keep]
            on_disk = sum(v.disk_bytes for v in self._runs.values())
            for run in folders[len(old):-1]:  # never the new run's own folder
                if on_disk <= self.disk_bytes:
                    break
                on_disk -= self._runs[run.name].disk_bytes if run.name in self._runs else 0
                old.append(run)
            for run in old:
                self._delete(run)
            self._fit(view)
            return view

    def add_frame(self, view: RunView, frame, write: bool = True) -> None:
        """Write the step's picture and show it (`view.save_frame`; a reopened run's, not `write`, is only
        shown), keep the frame, and drop the least recently used runs' frames past the memory bounds."""
        if write:
            view.save_frame(frame)
        else:
            view.show_frame(frame)
        with self._lock:
            if view.id in self._memory:
                view.keep_frame(frame)
                self._memory.move_to_end(view.id)
                self._fit(view)

    def restore(self, request, session: str | None, frames: list, origin: str) -> RunView:
        """A saved run's frames (`pipelines.outputs.OutputsFolder.load_frames`) back in memory for the
        timeline, as a new run of `session` with its own folder (for exports), within the bounds;
        `origin` says where it came from in its label. Nothing is written."""
        view = self.new_run(request, session)
        view.origin, view.ended = origin, True
        for frame in frames:
            self.add_frame(view, frame, write=False)
        return view

    def views(self, ids: list[str] | None) -> list[RunView]:
        """The runs of `ids` still on disk, in order; those in memory count as just used."""
        with self._lock:
            found = [self._runs[i] for i in ids or [] if i in self._runs]
            for view in found:
                if view.id in self._memory:
                    self._memory.move_to_end(view.id)
            return found

    def drop(self, ids: list[str], reason: str) -> None:
        """Free these runs' frames; their files stay."""
        with self._lock:
            for i in ids:
                if i in self._memory:
                    self._drop(self._memory[i], reason)

    def forget(self, ids: list[str] | None) -> None:
        """Free these runs' frames and delete their folders (a session that went away:
        `gr.State(delete_callback=...)`)."""
        with self._lock:
            for i in ids or []:
                if i in self._runs:
                    self._delete(self._runs[i].folder)

    def usage(self) -> dict[str, int]:
        """What the store holds now: runs and bytes in memory, runs and bytes of frames on disk."""
        with self._lock:
            return {"memory_runs": len(self._memory), "memory_bytes": sum(v.nbytes for v in self._memory.values()),
                    "disk_runs": len(self._runs), "disk_bytes": sum(v.disk_bytes for v in self._runs.values())}

    def _fit(self, view: RunView) -> None:
        # this session's share first, then everyone's; the least recently used run goes first
        mine = [v for v in self._memory.values() if v.session == view.session]
        while sum(v.nbytes for v in mine) > self.session_bytes:
            self._drop(mine.pop(0), self._why())
        while len(self._memory) > self.memory_runs or \
                sum(v.nbytes for v in self._memory.values()) > self.memory_bytes:
            self._drop(next(iter(self._memory.values())), self._why())

    def _why(self) -> str:
        return (f"This run's steps were dropped from memory: the server keeps the steps of its {self.memory_runs} "
                f"most recently used runs, up to {self.memory_bytes // MB} MB in all and "
                f"{self.session_bytes // MB} MB per session. Run it again (same seed and settings) to scrub it.")

    def _drop(self, view: RunView, reason: str) -> None:
        self._memory.pop(view.id, None)
        view.drop(reason)

    def _delete(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if self.on_delete is not None:
            self.on_delete(folder)
        view = self._runs.pop(folder.name, None)
        if view is not None:
            self._drop(view, "This run's files were deleted to keep the server's disk use bounded.")


@dataclass
class RunView:
    """What the browser shows of one run so far, and its frames for the timeline."""

    folder: Path
    request: object = None  # the GenerationRequest
    session: str | None = None  # the Gradio session that started it
    frames: list = field(default_factory=list, repr=False)
    levels: list[float] = field(default_factory=list)  # noise level of x_t at the start and after every step
    flow_matching: bool = False  # the levels are sigma (flow matching), not sqrt(1 - alpha_bar)
    final: str | None = None
    tensors: str | None = None  # the run's .safetensors file, once finished or stopped
    ended: bool = False  # finished, stopped or failed: no more frames come
    gallery: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (path, caption), one per step
    preview: str | None = None
    depth: str | None = None
    step: int = 0
    total: int = 0
    nbytes: int = 0  # memory held for the timeline: frames and input images
    disk_bytes: int = 0  # files written into `folder`
    dropped: str | None = None  # why the frames are no longer kept, once they are not
    origin: str = ""  # a run reopened from the outputs folder: which saved run it is
    _gallery_sent: int = 0
    _seen: set = field(default_factory=set, repr=False)  # ids of arrays counted in nbytes
    _unwritten: list = field(default_factory=list, repr=False)  # frames whose picture is not made yet (`complete`)

    @property
    def id(self) -> str:
        """Stable for the run's life and unique: its folder's name."""
        return self.folder.name

    @property
    def whole(self) -> bool:
        """Whether every step the run made is still in memory (none left it for the store's bounds)."""
        return not self.dropped and len(self.frames) == self.step

    def file_name(self, suffix: str) -> str:
        """A download's name, by mode, seed and run, so a folder of downloads tells them apart."""
        return f"{self.request.mode}-seed{self.request.seed}-{self.id[-8:]}.{suffix}"

    @property
    def label(self) -> str:
        r = self.request
        gone = " · steps dropped" if self.dropped else ""
        origin = f" · saved {self.origin}" if self.origin else ""
        return (f"#{self.id[-8:]} · {r.mode} · seed {r.seed} · {r.steps} steps · CFG {r.guidance_scale}{origin}"
                f"{gone}")

    def add_frame(self, frame) -> None:
        self.save_frame(frame)
        if not self.dropped:
            self.keep_frame(frame)

    def save_frame(self, frame) -> None:
        """Write the step's picture once and show it: preview, gallery, progress. A picture not made yet
        (on a CPU, the app's runs make none as they go: `pipelines.generate`) is written by `write_newest`
        when an update shows it, or by `complete`, so the stream never waits for a decode it does not show."""
        self.show_frame(frame)
        if frame.pixels.made:
            self._write(frame)
        else:
            self._unwritten.append(frame)
        if frame.depth is not None:
            self.depth = self.save(frame.depth, "depth.png")

    @property
    def unwritten(self) -> bool:
        """Whether `save_frame` left pictures for `complete` to write."""
        return bool(self._unwritten)

    def write_newest(self) -> None:
        """Write the newest step's picture if `save_frame` left it, decoding it now: the one the page's next
        update shows. On a CPU the app's runs make no picture as they go (`pipelines.generate`'s `live`
        False), so each update decodes the one it shows."""
        if self._unwritten and self._unwritten[-1].step == self.step:
            self._write(self._unwritten.pop())

    def complete(self) -> bool:
        """Write the pictures `save_frame` left (decoding them now), so the gallery holds every step made;
        whether there were any."""
        wrote = bool(self._unwritten)
        while self._unwritten:  # one at a time: a decode that fails leaves the rest for the next call
            self._write(self._unwritten[0])
            self._unwritten.pop(0)
        return wrote

    def _write(self, frame) -> None:
        path = self.save(frame.image, f"step_{frame.step:04d}.jpg")
        bisect.insort(self.gallery, (path, frame.caption))  # in step order (by path), written late or not
        self.preview = self.gallery[-1][0]

    def show_frame(self, frame) -> None:
        """Progress and noise levels up to this step."""
        if frame.schedule_t is not None:
            self.levels = frame.schedule_levels()
            self.flow_matching = frame.schedule.flow_matching
        self.step, self.total = frame.step, frame.total

    def keep_frame(self, frame) -> None:
        """Keep the frame for the timeline, and count the bytes it holds."""
        self.frames.append(frame)
        self.nbytes += held_bytes(frame, self._seen)

    def drop(self, reason: str) -> None:
        """Free the frames and input images; later frames are saved and shown but not kept."""
        self.frames, self.dropped, self.nbytes, self._seen = [], reason, 0, set()
        if self.request is not None and getattr(self.request, "image", None) is not None:
            self.request = replace(self.request, image=None, depth_map=None)

    def save(self, image: Image.Image, name: str) -> str:
        path = self.folder / name
        if name.endswith(".jpg"):
            image.save(path, FRAME_FORMAT, quality=FRAME_QUALITY)
        else:
            image.save(path)
        self.disk_bytes += path.stat().st_size
        return str(path)

    def gallery_due(self) -> bool:
        """True when the gallery has grown enough to be worth sending again."""
        if len(self.gallery) >= max(self._gallery_sent + 1, self._gallery_sent * GALLERY_GROWTH):
            self._gallery_sent = len(self.gallery)
            return True
        return False


def held_bytes(obj, seen: set[int], depth: int = 2) -> int:
    """Bytes of the arrays `obj` holds: torch tensors and numpy arrays (`.nbytes`), PIL
    images (width x height x bands), found as its attributes or theirs (a Frame's
    HostCopy holds a tensor). Each array counts once per `seen` (frames share a schedule)."""
    if id(obj) in seen:
        return 0
    if isinstance(obj, Image.Image):
        seen.add(id(obj))
        return obj.width * obj.height * len(obj.getbands())
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        seen.add(id(obj))
        return nbytes
    if depth and hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(held_bytes(value, seen, depth - 1) for value in vars(obj).values())
    return 0


def progress_html(step: int, total: int, note: str = "", levels: list[float] | None = None,
                  flow_matching: bool = False) -> str:
    pct = 100 * step / total if total else 0
    plot = schedule_svg(levels, step, flow_matching) if levels else ""
    return (
        f'<div class="sw-progress"><progress max="{total}" value="{step}"></progress>'
        f"<span>step {step}/{total} ({pct:.0f}%) {note}</span></div>{plot}"
    )


def noise_level_name(flow_matching: bool) -> str:
    """The noise level in the family's own terms: flow matching's x_t = (1 - sigma) x0 + sigma noise
    has sigma as the share of noise; SD's x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    return "σ" if flow_matching else "√(1−ᾱ)"


def schedule_svg(levels: list[float], current: int, flow_matching: bool = False, width: int = 480,
                 height: int = 120) -> str:
    """The noise level of x_t (`noise_level_name`) at the start (levels[0]) and after each step
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
        f'<text x="{pad}" y="{pad - 8}">noise level {noise_level_name(flow_matching)}</text><text x="{pad - 18}" y="{pad + 4}">1</text>'
        f'<text x="{pad - 18}" y="{height - pad + 4}">0</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">step {n}</text>'
        f'<polyline points="{line}" class="curve"/>{marker}</svg>'
    )



def lines_svg(series: list[tuple[str, list[float]]], current: int, y_label: str, width: int = 480,
              height: int = 130) -> str:
    """Each series (label, values after steps 1..n) as a line over the run's steps, the y axis from
    0 to the largest value (written at its top, with `y_label`); step `current` marked, none at 0."""
    pad, n = 28, max(len(values) for _, values in series)
    top = max((v for _, values in series for v in values), default=0) or 1.0
    x = [pad + (width - 2 * pad) * i / max(n - 1, 1) for i in range(n)]
    lines, legend = [], []
    for k, (label, values) in enumerate(series):
        y = [height - pad - (height - 2 * pad) * v / top for v in values]
        lines.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))}" class="curve c{k}"/>')
        if 1 <= current <= len(values):
            lines.append(f'<circle cx="{x[current - 1]:.1f}" cy="{y[current - 1]:.1f}" r="4" class="now"/>')
        legend.append(f'<tspan class="c{k}">— {label} </tspan>')
    marker = ""
    if 1 <= current <= n:
        cx = x[current - 1]
        marker = f'<line x1="{cx:.1f}" y1="{pad}" x2="{cx:.1f}" y2="{height - pad}" class="now"/>'
    return (
        f'<svg class="sw-schedule sw-lines" viewBox="0 0 {width} {height}" role="img" aria-label="{y_label}">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>'
        f'<text x="{pad}" y="{pad - 8}">{y_label}</text><text x="{pad - 4}" y="{pad + 4}" text-anchor="end">'
        f'{top:.2g}</text><text x="{pad - 4}" y="{height - pad + 4}" text-anchor="end">0</text>'
        f'<text x="{pad}" y="{height - 8}">step 1</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">step {n}</text>'
        f'{marker}{"".join(lines)}'
        f'<text x="{width - pad}" y="{pad - 8}" text-anchor="end">{"".join(legend)}</text></svg>'
    )
