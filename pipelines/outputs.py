"""Every run kept on disk: an outputs folder of run folders, a SQLite index over them, and a
saved run's steps read back as the frames the Inspect timeline shows.

    outputs/                                     --outputs DIR (created by the first save)
      index.sqlite                               one row per run; rebuilt from the folders
      2026-12-01/                                the local date the run ended
        20261201-053012-txt2img-seed7-1a2b3c4d/  time, mode, seed, run id: names sort by time
          20261201-053012-txt2img-seed7-1a2b3c4d.png          final image with A1111 parameters
          20261201-053012-txt2img-seed7-1a2b3c4d.safetensors  the run's tensors (export.save_run_tensors)
          input.png                              img2img and depth2img: the input image
          thumb.jpg                              the History's thumbnail
          steps/start.png, steps/xt_0001.png, steps/x0_0001.png, ..., steps/depth.png
          run.json                               the record: settings, status, timesteps, noise levels

A stopped run has no final image; its steps are all it has. Step pictures are the run's own
preview pixels, losslessly (PNG), so a reopened run shows exactly what streamed.

The folders are the truth and the index a cache of their records: a missing, damaged or stale
index is rebuilt from them. A run folder is written under a hidden name (`.<name>.partial`),
every file synced, then renamed into place, so a crash or a full disk never leaves a folder
that looks whole; a record changed later (pruning) is replaced atomically (temp file, fsync,
`os.replace`). Hidden `.partial` folders an hour old are leftovers of a crash, and deleted.

No torch at import: ui/ imports this module. `load_frames` imports it to rebuild frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .export import save_run_tensors
from .request import GenerationRequest

log = logging.getLogger(__name__)

INDEX = "index.sqlite"
RECORD = "run.json"
STEPS = "steps"
THUMB = "thumb.jpg"
INPUT = "input.png"
PARTIAL = ".partial"  # suffix of a hidden run folder being written or deleted
STALE_PARTIAL_S = 3600  # a .partial folder this old is a crash's leftover (no save takes an hour)
SCHEMA = 1  # the index's PRAGMA user_version; another value rebuilds it
THUMB_SIDE = 256  # px, the long side of a thumbnail (the History gallery shows them about this size)
# Step PNGs at zlib level 1: lossless like every level, and about as small as level 6 on previews
# (a 512x512 picture: 541 kB at 1, 497 kB at 6) at a fraction of the encoding time.
PNG_LEVEL = 1
GB = 10**9
FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputsError(RuntimeError):
    """The outputs folder could not be written or read; the message names it and says what to do."""


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """One saved run: its folder and its record (run.json), as the History lists it."""

    folder: Path
    record: dict[str, Any]

    @property
    def id(self) -> str:
        """The run folder's name: unique, and sorts by time."""
        return self.folder.name

    @property
    def settings(self) -> dict[str, Any]:
        """`GenerationRequest.settings()` of the run: mode, prompt, seed, steps, ..."""
        return self.record["settings"]

    @property
    def status(self) -> str:
        return self.record["status"]  # "finished" or "stopped"

    @property
    def final(self) -> Path | None:
        return self._file("final")

    @property
    def thumb(self) -> Path | None:
        return self._file("thumb")

    @property
    def tensors(self) -> Path | None:
        return self._file("tensors")

    @property
    def has_steps(self) -> bool:
        """Whether the run's steps can be reopened (saved, and not pruned)."""
        return self.record["files"].get("steps") is not None

    @property
    def caption(self) -> str:
        s = self.settings
        stopped = f" · stopped at {self.record['steps']['saved']}/{self.record['steps']['total']}" \
            if self.status == "stopped" else ""
        return f"{self.record['time'][:16].replace('T', ' ')} · {s['mode']} · seed {s['seed']}{stopped}"

    def request(self) -> GenerationRequest:
        """The run's settings as a request, to describe the run (its input images are not loaded)."""
        names = {f.name for f in dataclasses.fields(GenerationRequest)}
        values = {**self.settings, **self.record.get("run", {})}
        return GenerationRequest(**{k: v for k, v in values.items() if k in names})

    def _file(self, kind: str) -> Path | None:
        name = self.record["files"].get(kind)
        return self.folder / name if name else None


class OutputsFolder:
    """Runs saved under `root`, indexed in `root/index.sqlite`, within `max_bytes` when given.

    Nothing is created until the first `save`. Every method may be called from any thread:
    one lock serializes this process's index work (SQLite locks the file against others).
    Errors reading or writing the folder are `OutputsError`s that name it and say what to do.
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None):
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._checked = False  # the index was checked against the folders by this process
        # Pillow's PNG encoder releases the GIL: a run's step pictures encode in parallel, on threads
        # kept for the folder's life (a pool per save would start threads, and malloc arenas, each run)
        self._encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="stepwise-save")

    # ---- saving ----

    def reserve(self, request: GenerationRequest) -> Path:
        """The folder a run of `request` is saved in by `save(..., folder=...)`, named now: the local
        date, then time, mode, seed and a random id. Nothing is written."""
        now = datetime.now().astimezone()
        return self.root / f"{now:%Y-%m-%d}" / f"{now:%Y%m%d-%H%M%S}-{request.mode}-seed{request.seed}-{os.urandom(4).hex()}"

    def save(self, request: GenerationRequest, model: str, frames: list, *, status: str = "finished",
             final: str | Path | None = None, tensors: str | Path | None = None, owner: str | None = None,
             notes: tuple[str, ...] = (), missing_steps: str | None = None, folder: Path | None = None) -> SavedRun:
        """Save one run, in `folder` (from `reserve`; default: reserved now): `final` (a PNG written by
        `metadata.save_png`; None for a stopped run) and `tensors` (its .safetensors file; None: written
        here from `frames`) are copied; `frames` (`generate.Frame`s, in order from step 1; empty with
        `missing_steps`, why they are gone) become step pictures; `owner` is the History's user key.
        Raises OutputsError."""
        now = datetime.now().astimezone()
        folder = folder or self.reserve(request)
        name, day = folder.name, folder.parent
        partial = day / f".{name}{PARTIAL}"
        try:
            partial.mkdir(parents=True)
            files = self._write_files(partial, name, request, model, frames, final, tensors)
            record = {
                "format": SCHEMA, "id": name, "time": now.isoformat(timespec="seconds"), "created": now.timestamp(),
                "status": status, "model": model, "owner": owner, "settings": request.settings(),
                "run": {"preview": request.preview, "view": request.view,
                        "record_attention": request.record_attention},
                "notes": list(notes), "files": files, "steps": _steps_record(frames, missing_steps), "pruned": None,
            }
            _write(partial / RECORD, json.dumps(record, indent=1).encode())  # last: the folder is complete
            _sync_folder(partial)
            os.replace(partial, day / name)
            _sync_folder(day)
        except BaseException as err:  # noqa: BLE001 - whatever stopped it, no half-written folder stays
            shutil.rmtree(partial, ignore_errors=True)
            if not isinstance(err, OSError):
                raise
            raise OutputsError(_cannot(f"save this run in {self.root}", err)) from err
        run = SavedRun(day / name, record)
        with self._lock:
            try:
                self._ready()
                with self._db() as db:
                    _insert(db, run, self.root)
            except (OSError, sqlite3.Error) as err:
                self._checked = False  # check against the folders on the next use
                raise OutputsError(f"the run is saved in {run.folder}, but the index {self.root / INDEX} could "
                                   f"not be updated ({err}); it is rebuilt from the folders on the next start"
                                   ) from err
        return run

    def _write_files(self, folder: Path, name: str, request: GenerationRequest, model: str, frames: list,
                     final: str | Path | None, tensors: str | Path | None) -> dict[str, str | None]:
        files: dict[str, str | None] = {"final": None, "tensors": None, "input": None, "thumb": THUMB, "steps": None}
        if final is not None:
            files["final"] = f"{name}.png"
            _write(folder / files["final"], Path(final).read_bytes())
        if request.image is not None:
            files["input"] = INPUT
            _write(folder / INPUT, png_bytes(request.image))
        if final is not None:
            with Image.open(folder / files["final"]) as image:
                thumb = image.convert("RGB")
        else:  # stopped: the last step as it streamed
            thumb = frames[-1].image.convert("RGB")
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        thumb.save(buffer, "JPEG", quality=85)
        _write(folder / THUMB, buffer.getvalue())
        if not frames:
            return files
        files["tensors"] = f"{name}.safetensors"
        if tensors is not None:
            _write(folder / files["tensors"], Path(tensors).read_bytes())
        else:
            save_run_tensors(frames, folder / files["tensors"], {"model": model, "settings": request.settings()})
            _sync_file(folder / files["tensors"])
        steps = folder / STEPS
        steps.mkdir()
        pictures = {"start.png": frames[0].start_pixels}
        if frames[0].depth_pixels is not None:
            pictures["depth.png"] = frames[0].depth_pixels
        for f in frames:
            pictures[f"xt_{f.step:04d}.png"] = f.xt_pixels
            pictures[f"x0_{f.step:04d}.png"] = f.x0_pixels
        list(self._encoders.map(lambda item: _write(steps / item[0], png_bytes(item[1].pil())), pictures.items()))
        _sync_folder(steps)
        files["steps"] = STEPS
        return files

    # ---- reading ----

    def runs(self, search: str = "", mode: str | None = None, model: str | None = None, owner: str | None = None,
             limit: int = 200) -> list[SavedRun]:
        """Saved runs, newest first: those whose prompt or negative prompt contains `search` (any
        case), of `mode` and `model` when given, of `owner` when given (None: everyone's). A run
        folder deleted by hand is left out and leaves the index. Raises OutputsError."""
        where, args = [], []
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("(prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\')")
            args += [f"%{escaped}%"] * 2
        for column, value in (("mode", mode), ("model", model), ("owner", owner)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = (f"SELECT folder, record FROM runs {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY created DESC, id DESC LIMIT ?")
        rows = self._query(sql, (*args, limit))
        found = [SavedRun(self.root / folder, json.loads(record)) for folder, record in rows]
        gone = [run.id for run in found if not run.folder.is_dir()]
        if gone:
            self._forget(gone)
        return [run for run in found if run.id not in gone]

    def models(self, owner: str | None = None) -> list[str]:
        """The models of the saved runs (of `owner` when given), by name."""
        if owner is None:
            rows = self._query("SELECT DISTINCT model FROM runs ORDER BY model", ())
        else:
            rows = self._query("SELECT DISTINCT model FROM runs WHERE owner = ? ORDER BY model", (owner,))
        return [model for (model,) in rows]

    def get(self, run_id: str) -> SavedRun | None:
        """The saved run named `run_id`, or None (never saved, or its folder is gone)."""
        rows = self._query("SELECT folder, record FROM runs WHERE id = ?", (run_id,))
        runs = [SavedRun(self.root / folder, json.loads(record)) for folder, record in rows]
        return runs[0] if runs and runs[0].folder.is_dir() else None

    def load_frames(self, run: SavedRun) -> list:
        """The run's steps as `generate.Frame`s, as the run made them: the same x_t and x0 pictures
        (uint8 (H, W, 3)), starting and depth pictures, latents (1, C, h, w) and the tensors inside
        the denoiser (float32, as the tensors file keeps them), timesteps and noise levels. Raises
        OutputsError when its steps were not saved, were pruned, or their files are damaged."""
        if not run.has_steps:
            if run.record.get("pruned"):
                why = f"they were pruned on {run.record['pruned'][:10]} to keep the outputs within --outputs-max-gb"
            else:
                why = run.record["steps"].get("missing") or "they were not saved"
            raise OutputsError(f"This run's steps cannot be reopened: {why}. Its pictures stay in {run.folder}.")
        try:
            return _frames(run)
        except (OSError, ValueError, KeyError) as err:
            raise OutputsError(f"This run's steps in {run.folder} cannot be read ({err}): its files are damaged "
                               "or were changed by hand.") from err

    # ---- bounding ----

    def prune(self, keep: str | None = None) -> list[str]:
        """Bring the folder within `max_bytes`: first the oldest runs' step data (steps/ and the
        tensors file; a stopped run is all step data, so it goes whole), then the oldest runs
        whole, final images last. The run `keep` (the one just saved) is never touched, so the
        folder may exceed the bound by that run. Returns what was pruned, one line each (also
        logged). Raises OutputsError."""
        if self.max_bytes is None:
            return []
        with self._lock:
            rows = self._query("SELECT id, folder, status, step_bytes, keep_bytes FROM runs ORDER BY created, id", ())
            gone = [row[0] for row in rows if not (self.root / row[1]).is_dir()]  # deleted by hand
            if gone:
                self._forget(gone)
                rows = [row for row in rows if row[0] not in gone]
            total = sum(step + kept for _, _, _, step, kept in rows)
            if total <= self.max_bytes:
                return []
            start, steps_of, whole = total, [], []
            try:
                for run_id, folder, status, step, kept in rows:
                    if total <= self.max_bytes:
                        break
                    if run_id == keep or not step:
                        continue
                    if status == "stopped":
                        self._delete(run_id, self.root / folder)
                        whole.append(run_id)
                        total -= step + kept
                    else:
                        self._drop_steps(run_id, self.root / folder)
                        steps_of.append(run_id)
                        total -= step
                for run_id, folder, _, step, kept in rows:
                    if total <= self.max_bytes:
                        break
                    if run_id == keep or run_id in whole:
                        continue
                    self._delete(run_id, self.root / folder)
                    whole.append(run_id)
                    total -= kept + (0 if run_id in steps_of else step)
            except (OSError, sqlite3.Error) as err:
                raise OutputsError(_cannot(f"prune {self.root} to --outputs-max-gb", err)) from err
        bound = f"The outputs folder {self.root} was over --outputs-max-gb {self.max_bytes / GB:g}"
        notes = []
        if steps_of:
            notes.append(f"{bound}: removed the steps of the {len(steps_of)} oldest run(s), their final images "
                         f"kept: {', '.join(steps_of)}.")
        if whole:
            notes.append(f"{bound}: deleted the {len(whole)} oldest run(s) whole: {', '.join(whole)}.")
        if notes:
            notes[-1] += f" It holds {total / GB:.3g} GB now (was {start / GB:.3g} GB)."
        for note in notes:
            log.info("%s", note)
        return notes

    def _drop_steps(self, run_id: str, folder: Path) -> None:
        # the record first: a crash after it leaves unlisted files, never a record naming missing ones
        record = json.loads((folder / RECORD).read_text())
        tensors = record["files"]["tensors"]
        record["files"] |= {"steps": None, "tensors": None}
        record["pruned"] = datetime.now().astimezone().isoformat(timespec="seconds")
        _replace(folder / RECORD, json.dumps(record, indent=1).encode())
        with self._db() as db:
            db.execute("UPDATE runs SET record = ?, step_bytes = 0 WHERE id = ?", (json.dumps(record), run_id))
        shutil.rmtree(folder / STEPS, ignore_errors=True)
        if tensors:
            (folder / tensors).unlink(missing_ok=True)

    def _delete(self, run_id: str, folder: Path) -> None:
        # hidden first: a crash mid-delete leaves a .partial folder (cleaned later), not half a run
        gone = folder.with_name(f".{folder.name}{PARTIAL}")
        os.replace(folder, gone)
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        shutil.rmtree(gone, ignore_errors=True)
        with contextlib.suppress(OSError):  # the date's folder, once empty
            folder.parent.rmdir()

    # ---- the index ----

    @contextlib.contextmanager
    def _db(self):
        """A connection to the index, committed (or rolled back) and closed on exit."""
        db = sqlite3.connect(self.root / INDEX, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        """Rows of `sql`; [] before the first save. An index damaged meanwhile is rebuilt and asked again."""
        with self._lock:
            try:
                if not self._ready():
                    return []
                try:
                    with self._db() as db:
                        return db.execute(sql, args).fetchall()
                except sqlite3.DatabaseError as err:
                    log.warning("the index %s is damaged (%s); rebuilding it from the run folders",
                                self.root / INDEX, err)
                    self._rebuild()
                    with self._db() as db:
                        return db.execute(sql, args).fetchall()
            except (OSError, sqlite3.Error) as err:
                raise OutputsError(_cannot(f"read the index {self.root / INDEX}", err)) from err

    def _ready(self) -> bool:
        """Check the index against the run folders once per process: rebuild it when missing,
        damaged or of another schema; else add the runs it lacks and drop those gone. False
        while there is no outputs folder."""
        if self._checked:
            return True
        if not self.root.is_dir():
            return False
        try:
            with self._db() as db:
                healthy = db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA and \
                    db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                if healthy:
                    self._reconcile(db)
        except sqlite3.DatabaseError as err:
            log.warning("the index %s is damaged (%s); rebuilding it from the run folders", self.root / INDEX, err)
            healthy = False
        if not healthy:
            self._rebuild()
        self._checked = True
        return True

    def _reconcile(self, db: sqlite3.Connection) -> None:
        on_disk = {run.id: run for run in self._scan()}
        indexed = {run_id for (run_id,) in db.execute("SELECT id FROM runs")}
        for run_id in on_disk.keys() - indexed:
            _insert(db, on_disk[run_id], self.root)
        db.executemany("DELETE FROM runs WHERE id = ?", [(run_id,) for run_id in indexed - on_disk.keys()])
        if on_disk.keys() ^ indexed:
            log.info("index %s: added %d run(s) found in the folder, dropped %d gone from it", self.root / INDEX,
                     len(on_disk.keys() - indexed), len(indexed - on_disk.keys()))

    def _rebuild(self) -> None:
        """A new index from every run folder's record, swapped in atomically."""
        fresh = self.root / f".{INDEX}.rebuild"
        fresh.unlink(missing_ok=True)
        runs = self._scan()
        db = sqlite3.connect(fresh)
        try:
            with db:
                db.executescript(_SCHEMA_SQL)
                for run in runs:
                    _insert(db, run, self.root)
        finally:
            db.close()
        _sync_file(fresh)
        for leftover in ("-journal", "-wal", "-shm"):  # the old file's: SQLite would apply them to the new one
            (self.root / f"{INDEX}{leftover}").unlink(missing_ok=True)
        os.replace(fresh, self.root / INDEX)
        log.debug("index %s rebuilt from %d run folder(s)", self.root / INDEX, len(runs))  # damage is warned above

    def _scan(self) -> list[SavedRun]:
        """Every run folder's record; folders without a readable record are skipped (logged), and
        `.partial` leftovers of a crash deleted."""
        runs = []
        for day in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for folder in sorted(day.iterdir()):
                if folder.name.startswith(".") and folder.name.endswith(PARTIAL):
                    if time.time() - folder.stat().st_mtime > STALE_PARTIAL_S:
                        log.warning("deleting %s: a run folder left half-written or half-deleted", folder)
                        shutil.rmtree(folder, ignore_errors=True)
                    continue
                if not folder.is_dir() or folder.name.startswith(".") or not (folder / RECORD).is_file():
                    continue
                try:
                    record = json.loads((folder / RECORD).read_text())
                    if not {"created", "status", "settings", "files", "steps"} <= record.keys():
                        raise ValueError("not a run record")
                except (OSError, ValueError, AttributeError) as err:
                    log.warning("skipping %s: its %s cannot be read (%s)", folder, RECORD, err)
                    continue
                runs.append(SavedRun(folder, record))
        return runs

    def _forget(self, run_ids: list[str]) -> None:
        with self._lock, self._db() as db:
            db.executemany("DELETE FROM runs WHERE id = ?", [(run_id,) for run_id in run_ids])


_SCHEMA_SQL = f"""
CREATE TABLE runs (
    id TEXT PRIMARY KEY,          -- the run folder's name
    folder TEXT NOT NULL,         -- relative to the outputs folder: <date>/<id>
    created REAL NOT NULL,        -- when it was saved, Unix seconds
    status TEXT NOT NULL,         -- finished or stopped
    mode TEXT NOT NULL, model TEXT, prompt TEXT, negative_prompt TEXT, seed INTEGER,
    owner TEXT,                   -- the History's user key: auth username or browser key
    step_bytes INTEGER NOT NULL,  -- steps/ and the tensors file: pruned first
    keep_bytes INTEGER NOT NULL,  -- the rest: final image, thumbnail, input, record
    record TEXT NOT NULL          -- run.json: every setting, the files, the steps' timesteps and levels
);
CREATE INDEX runs_created ON runs (created);
PRAGMA user_version = {SCHEMA};
"""


def _insert(db: sqlite3.Connection, run: SavedRun, root: Path) -> None:
    r, s = run.record, run.settings
    step_bytes = _bytes(run.folder / STEPS) + (_bytes(run.tensors) if run.tensors else 0)
    keep_bytes = _bytes(run.folder) - step_bytes
    db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (run.id, run.folder.relative_to(root).as_posix(), r["created"], r["status"], s["mode"], r["model"],
                s.get("prompt", ""), s.get("negative_prompt", ""), s.get("seed"), r.get("owner"), step_bytes,
                keep_bytes, json.dumps(r)))


def _bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder; 0 when absent."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _steps_record(frames: list, missing: str | None) -> dict[str, Any]:
    """What the timeline's text and pictures need beside the saved pictures and tensors: per step its
    timestep, total and time; the run's noise levels (start and after every step), their kind and the
    model's prediction type; the attention's tokens; the latent->RGB map the noise pictures use."""
    if not frames:
        return {"saved": 0, "total": 0, "missing": missing}
    first = frames[0]
    rgb = first.latent_rgb
    return {"saved": len(frames), "total": first.total, "missing": None,
            "step": [f.step for f in frames], "timesteps": [f.timestep for f in frames],
            "seconds": [f.seconds for f in frames], "levels": first.schedule_levels(),
            "flow_matching": first.schedule.flow_matching, "prediction_type": first.schedule.prediction_type,
            "tokens": list(first.tokens),
            "latent_rgb": rgb.to_dict() if rgb is not None else None}


def _frames(run: SavedRun) -> list:
    # torch only here: ui/ imports this module, and only a reopened run needs frames
    import torch
    from safetensors.torch import load_file

    from .generate import Frame
    from .previews import HostCopy, LatentRGB, SavedSchedule

    steps, files = run.record["steps"], run.record["files"]
    folder = run.folder / files["steps"]
    tensors = load_file(str(run.folder / files["tensors"]))

    def picture(name: str) -> HostCopy:
        with Image.open(folder / name) as image:
            return HostCopy(torch.from_numpy(np.array(image.convert("RGB"))))

    def row(name: str, i: int) -> HostCopy | None:
        return HostCopy(tensors[name][i : i + 1]) if name in tensors else None

    schedule = SavedSchedule(steps["timesteps"], steps["levels"], steps["flow_matching"],
                             steps.get("prediction_type", "epsilon"))
    latent_rgb = LatentRGB.from_dict(steps["latent_rgb"]) if steps.get("latent_rgb") else None
    view, tokens = run.record["run"]["view"], tuple(steps["tokens"])
    frames = []
    per_step = zip(steps["step"], steps["timesteps"], steps["seconds"], strict=True)
    for i, (step, timestep, seconds) in enumerate(per_step):
        first = i == 0
        frames.append(Frame(
            step=step, total=steps["total"], t=HostCopy(torch.tensor(timestep, dtype=torch.float64)), view=view,
            seconds=seconds, xt_pixels=picture(f"xt_{step:04d}.png"), x0_pixels=picture(f"x0_{step:04d}.png"),
            latents=row("latents", i + 1), schedule=schedule,
            depth_pixels=picture("depth.png") if first and (folder / "depth.png").is_file() else None,
            start_pixels=picture("start.png") if first else None, start_latents=row("latents", 0) if first else None,
            x0=row("x0", i), noise_pred=row("noise_pred", i), noise_pred_text=row("noise_pred_text", i),
            noise_pred_uncond=row("noise_pred_uncond", i),
            attention=HostCopy(tensors["attention"][i]) if "attention" in tensors else None, tokens=tokens,
            latent_rgb=latent_rgb))
    return frames


def png_bytes(image: Image.Image) -> bytes:
    """A picture as PNG at `PNG_LEVEL` (lossless: saved runs and worker messages keep the run's pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """A new file, synced to disk (inside a .partial folder: the folder's rename makes it whole)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(path: Path, data: bytes) -> None:
    """Replace `path` atomically: a synced temp file beside it, renamed over it."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)
    try:
        _write(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sync_folder(path: Path) -> None:
    """Make a folder's new entries (files, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cannot(what: str, err: OSError | sqlite3.Error) -> str:
    """A message: could not `what`, why, and what to do, by the error's errno (or SQLite's words)."""
    why = getattr(err, "strerror", None) or str(err)
    if getattr(err, "errno", None) in FULL or "disk is full" in why:
        return (f"could not {what}: the disk is full ({why}). Free space there, or start the app with "
                "--outputs DIR on another disk, --outputs-max-gb N to bound it, or --no-save")
    if getattr(err, "errno", None) in READ_ONLY or "readonly" in why:
        return (f"could not {what}: it is not writable ({why}). Make it writable, or start the app "
                "with --outputs DIR (a writable folder) or --no-save")
    return f"could not {what}: {err}. Check the folder, or start the app with --outputs DIR or --no-save"
