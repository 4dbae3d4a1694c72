"""Every run saved in the outputs folder: its PNG and index row, the History after a restart showing
the very steps the run streamed, atomic writes, the index rebuilt from the folders, a disk that
refuses, per-user history, and pruning to --outputs-max-gb."""

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

import app as app_module
from pipelines import Final, Frame, Limits, generate, validate_request
from pipelines.metadata import read_parameters, save_png
from pipelines.outputs import INDEX, OutputsError, OutputsFolder
from ui.events import API_OUTPUTS as OUT
from ui.history import ALL, History
from ui.inspect import Inspector

from .conftest import pixels
from .test_messages import fire

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(prompt="a red square", negative_prompt="blurry", seed=21, steps=3, guidance_scale=5.0, width=32, height=32,
           scheduler="Euler", preview="full-vae", view="x0")


@pytest.fixture
def serve(serve_tiny):
    return serve_tiny


def run_api(demo, **overrides) -> list:
    client = Client(demo.local_url, verbose=False, download_files=False)
    return list(client.submit(**{**RUN, **overrides}, api_name="/txt2img"))


def history_of(demo) -> History:
    return next(f.fn.__self__ for f in demo.fns.values() if isinstance(getattr(f.fn, "__self__", None), History))


def handler(demo, api_name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == api_name)


def saved_folders(root: Path) -> list[Path]:
    """Run folders under their own names (not hidden .partial ones)."""
    return sorted(p.parent for p in root.glob("*/*/run.json") if not p.parent.name.startswith("."))


# ---- through the app ----


def test_a_run_through_the_api_is_saved_with_its_settings_in_the_png_and_an_index_row(serve, tmp_path):
    demo = serve("--outputs", str(tmp_path / "outputs"))
    info = run_api(demo)[-1][OUT["info"]]
    [folder] = saved_folders(tmp_path / "outputs")
    assert f"Saved in `{folder}`" in info
    # named so that files sort by time and show mode and seed: 20261201-053012-txt2img-seed21-1a2b3c4d
    date, clock, mode, seed, run_id = folder.name.split("-")
    assert folder.parent.name == f"{date[:4]}-{date[4:6]}-{date[6:]}" and len(clock) == 6
    assert (mode, seed, len(run_id)) == ("txt2img", "seed21", 8)
    read = read_parameters(folder / f"{folder.name}.png", Limits(min_side=16))  # through sd-parsers
    assert read.generator == "AUTOMATIC1111"
    assert read.fields == dict(prompt="a red square", negative_prompt="blurry", seed=21, steps=3, guidance_scale=5.0,
                               width=32, height=32, scheduler="Euler")
    with sqlite3.connect(tmp_path / "outputs" / INDEX) as db:
        rows = db.execute("SELECT id, status, mode, model, prompt, seed, record FROM runs").fetchall()
    label = "untrained tiny model 'ckpt' (random weights)"  # the model as the page names it
    assert [row[:6] for row in rows] == [(folder.name, "finished", "txt2img", label, "a red square", 21)]
    record = json.loads(rows[0][6])
    assert record == json.loads((folder / "run.json").read_text())
    assert record["settings"] == dict(mode="txt2img", **{k: v for k, v in RUN.items() if k not in ("preview", "view")})
    assert record["run"] == dict(preview="full-vae", view="x0", record_attention=False)
    assert record["steps"]["saved"] == 3 and len(list((folder / "steps").glob("x0_*.png"))) == 3


def test_after_a_restart_the_history_lists_the_run_and_opens_the_steps_shown_live(serve, tmp_path):
    outputs = tmp_path / "outputs"
    first = serve("--outputs", str(outputs))
    final = run_api(first, steps=4, record_attention=True)[-1][OUT["final"]]
    live_id = Path(final["path"]).parent.name  # the run's folder in Gradio's cache is its id in the run store
    live = first.run_store.views([live_id])
    first.close()

    second = serve("--outputs", str(outputs))  # the restart: a new app over the same folder
    history = history_of(second)
    gallery, ids, *_, note = history.list("", ALL, ALL, None, None)
    assert len(ids) == 1 and gallery[0][1].endswith("· txt2img · seed 21") and note.startswith("1 run ·")
    runs = history.open(ids, ids[0], [], gr.Request(session_hash="after-restart"))
    back = second.run_store.views(runs)
    assert back[0].label.endswith("· txt2img · seed 21 · 4 steps · CFG 5.0 · saved " + gallery[0][1].split(" · ")[0])
    inspector = Inspector(None)
    for step in range(5):  # 0: the latents the run started from
        shown, reopened = inspector.show(live, live_id, None, step), inspector.show(back, runs[0], None, step)
        for a, b in zip(shown[:2], reopened[:2], strict=True):  # x_t and x0, as the run made them
            assert (a is None and b is None) or np.array_equal(pixels(a), pixels(b))
        assert reopened[3] == shown[3] and reopened[5] == shown[5]  # the step's text and the schedule plot
        assert [np.array_equal(pixels(a), pixels(b)) for (a, _), (b, _) in zip(shown[4], reopened[4], strict=True)] \
            == [True] * 4  # the latent channels
        # inside the denoiser: the same notes, plot, labels and pictures (update, guidance, each token's map)
        inside, inside_back = inspector.inside(live, live_id, step, 1), inspector.inside(back, runs[0], step, 1)
        pictures = [*inside.update, *inside.guidance, *inside.grid, *([inside.overlay] if inside.overlay else [])]
        back_pictures = [*inside_back.update, *inside_back.guidance, *inside_back.grid,
                         *([inside_back.overlay] if inside_back.overlay else [])]
        assert [label for _, label in pictures] == [label for _, label in back_pictures]
        assert all(np.array_equal(pixels(a), pixels(b)) for (a, _), (b, _) in zip(pictures, back_pictures))
        assert (inside.update_note, inside.guidance_note, inside.guidance_plot, inside.attention_note, inside.tokens) \
            == (inside_back.update_note, inside_back.guidance_note, inside_back.guidance_plot,
                inside_back.attention_note, inside_back.tokens)
        assert step == 0 or (len(pictures) == 4 + 3 + len(inside.tokens) + 1 and inside.tokens)
    with zipfile.ZipFile(inspector.export(live, live_id, "zip")) as a, \
            zipfile.ZipFile(inspector.export(back, runs[0], "zip")) as b:  # the export: the same PNGs
        assert [a.read(n) for n in a.namelist()] == [b.read(n) for n in b.namelist()] and len(a.namelist()) == 4


def test_a_stopped_run_is_saved_with_the_steps_it_made(serve, tmp_path):
    demo = serve("--outputs", str(tmp_path / "outputs"))
    client = Client(demo.local_url, verbose=False)
    job = client.submit(**{**RUN, "steps": 150, "preview": "latent-rgb"}, api_name="/txt2img")
    for update in job:
        if update[OUT["preview"]]:
            client.predict(api_name="/stop")
            break
    last = job.outputs()[-1] if job.done() else list(job)[-1]
    [folder] = saved_folders(tmp_path / "outputs")
    record = json.loads((folder / "run.json").read_text())
    made = int(last[OUT["info"]].split("step ")[1].split("/")[0])
    assert last[OUT["info"]].endswith(f"Saved in `{folder}`")
    assert record["status"] == "stopped" and record["files"]["final"] is None
    assert (record["steps"]["saved"], record["steps"]["total"]) == (made, 150)
    outputs = OutputsFolder(tmp_path / "outputs")
    run = outputs.runs()[0]
    assert run.caption.endswith(f"stopped at {made}/150") and len(outputs.load_frames(run)) == made


@pytest.mark.parametrize("error,message", [
    (OSError(errno.ENOSPC, "No space left on device"),
     "the disk is full (No space left on device). Free space there, or start the app with --outputs DIR on another "
     "disk, --outputs-max-gb N to bound it, or --no-save."),
    (PermissionError(errno.EACCES, "Permission denied"),
     "it is not writable (Permission denied). Make it writable, or start the app with --outputs DIR (a writable "
     "folder) or --no-save."),
    (OSError(errno.EROFS, "Read-only file system"),
     "it is not writable (Read-only file system). Make it writable, or start the app with --outputs DIR (a writable "
     "folder) or --no-save."),
])
def test_a_full_or_read_only_outputs_folder_is_a_clear_warning_and_the_run_still_completes(serve, tmp_path, monkeypatch,
                                                                                          error, message):
    demo = serve("--outputs", str(tmp_path / "outputs"))

    def refuse(path, data):
        raise error

    monkeypatch.setattr("pipelines.outputs._write", refuse)
    got = fire(demo.local_url, "generate-txt2img", "click", [None, None, *RUN.values(), False])  # as the page does
    assert got["error"] is None
    preview, gallery, final, status, info, tensors, runs = got["outputs"]
    assert final["path"].endswith("final.png") and len(gallery) == 3 and "step 3/3" in status and "Saved" not in info
    assert ("warning", f"Could not save this run in {tmp_path / 'outputs'}: {message} The run's images are still "
                       "in this page.") in got["toasts"]
    assert saved_folders(tmp_path / "outputs") == [] and not list((tmp_path / "outputs").glob("*/.*"))


def test_two_users_see_only_their_own_runs_with_per_user_history(serve, tmp_path):
    shared = serve("--outputs", str(tmp_path / "outputs"), "--share")  # a public link: each user their own History
    history, txt2img = history_of(shared), handler(shared, "txt2img")
    assert history.private
    users = {}
    for session in ("ann", "bob"):
        key, owner = history.user(None, gr.Request(session_hash=session))
        assert key == owner and len(key) == 32 and history.user(key, gr.Request(session_hash=session)) == (key, key)
        request = gr.Request(session_hash=session)
        for seed in (1, 2) if session == "ann" else (3,):
            list(txt2img(request, owner=owner, **{**RUN, "seed": seed}))
        users[session] = owner
    seen = {session: history.list("", ALL, ALL, owner, None) for session, owner in users.items()}
    assert [caption.split("seed ")[1] for _, caption in seen["ann"][0]] == ["2", "1"]  # newest first
    assert [caption.split("seed ")[1] for _, caption in seen["bob"][0]] == ["3"]
    assert history.list("", ALL, ALL, None, None)[:2] == ([], [])  # a page that has not said who it is: nothing
    with pytest.raises(gr.Error, match="Pick a run first"):  # Bob cannot open Ann's run by its id
        history.open(seen["bob"][1], seen["ann"][1][0], [], gr.Request(session_hash="bob"))
    # --auth: the username is the user, whatever the browser's key
    assert history.user(users["ann"], gr.Request(username="cat", session_hash="x")) == (users["ann"], "cat")
    # --shared-history: everyone sees every run
    everyone = history_of(serve("--outputs", str(tmp_path / "outputs"), "--share", "--shared-history"))
    assert not everyone.private and len(everyone.list("", ALL, ALL, users["bob"], None)[1]) == 3
    # locally (no --share, no Space) one user: all runs
    assert not history_of(serve("--outputs", str(tmp_path / "outputs"))).private


def test_a_space_is_a_shared_deployment(monkeypatch):
    assert not app_module.shared_deployment(app_module.parse_args([]))
    monkeypatch.setenv("SPACE_ID", "someone/stepwise")
    assert app_module.shared_deployment(app_module.parse_args([]))


def test_no_save_writes_nothing_and_has_no_history(serve, outputs_default):
    before = sorted(outputs_default.rglob("*"))
    demo = serve("--no-save")
    assert "Saved" not in run_api(demo)[-1][OUT["info"]]
    assert sorted(outputs_default.rglob("*")) == before
    assert not any(getattr(block, "elem_id", None) == "history" for block in demo.blocks.values())


def test_outputs_flags_are_checked_at_start(tiny_dir, cache):
    for bad in ("0", "-1"):
        with pytest.raises(ValueError, match=f"--outputs-max-gb must be a positive number of GB, got {float(bad)}"):
            app_module.create_demo(app_module.parse_args(["--outputs-max-gb", bad]), cache)
    with pytest.raises(SystemExit):  # argparse: not allowed with --no-save
        app_module.parse_args(["--outputs", "x", "--no-save"])
    assert app_module.outputs_folder(app_module.parse_args(["--outputs-max-gb", "1.5"])).max_bytes == 1_500_000_000


# ---- the folder itself ----


@pytest.fixture(scope="module")
def made(cache):
    """One run of the bundled model: its request, frames and final PNG (written by save_png)."""
    req = validate_request(dict(mode="txt2img", prompt="a red circle", seed=3, steps=3, width=64, height=64,
                                scheduler="DDIM", preview="latent-rgb", view="x_t", guidance_scale=4.0))
    out = list(generate(req, cache))
    frames, final = [o for o in out if isinstance(o, Frame)], out[-1]
    assert isinstance(final, Final)
    return req, frames, final


@pytest.fixture
def save(made, tmp_path):
    """save(folder, **request overrides, status=..., steps=N): one saved run (the same frames, other settings)."""
    req, frames, final = made
    png = save_png(final, tmp_path / "final.png", "micro")

    def one(folder: OutputsFolder, status="finished", steps=None, model="micro", **overrides):
        request = validate_request({**req.settings(), "preview": req.preview, "view": req.view, **overrides})
        kept = frames[:steps] if steps else frames
        return folder.save(request, model, kept, status=status, final=png if status == "finished" else None)

    return one


def test_a_save_that_fails_midway_leaves_no_folder_under_its_name(save, tmp_path, monkeypatch):
    outputs = OutputsFolder(tmp_path / "outputs")
    monkeypatch.setattr("pipelines.outputs.os.replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(OutputsError, match=f"could not save this run in {tmp_path / 'outputs'}: "):
        save(outputs)
    assert saved_folders(tmp_path / "outputs") == [] and not list((tmp_path / "outputs").rglob(".*"))
    monkeypatch.undo()
    assert outputs.runs() == []


def test_a_process_killed_mid_save_leaves_only_a_hidden_partial_folder(save, made, tmp_path):
    """The process dies halfway through writing the record (the last file): nothing looks whole."""
    req, _, final = made
    png = save_png(final, tmp_path / "final.png", "micro")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "import pipelines.outputs as o\n"
        "from pipelines import validate_request\n"
        "write = o._write\n"
        "def dying(path, data):\n"
        "    if path.name == o.RECORD:\n"
        "        with open(path, 'xb') as f:\n"
        "            f.write(data[: len(data) // 2]); f.flush()\n"
        "        os._exit(9)\n"
        "    write(path, data)\n"
        "o._write = dying\n"
        f"req = validate_request({req.settings()!r})\n"
        f"o.OutputsFolder(sys.argv[1]).save(req, 'micro', [], final={str(png)!r}, missing_steps='a test')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "outputs")], cwd=ROOT, timeout=120)
    assert result.returncode == 9
    [partial] = (tmp_path / "outputs").glob("*/.*.partial")
    assert (partial / "run.json").stat().st_size > 0 and saved_folders(tmp_path / "outputs") == []
    outputs = OutputsFolder(tmp_path / "outputs")
    assert outputs.runs() == [] and partial.exists()  # a save may still be going on in another process
    save(outputs)
    old = partial.stat().st_mtime - 2 * 3600
    os.utime(partial, (old, old))  # an hour on: a crash's leftover
    (tmp_path / "outputs" / INDEX).unlink()
    assert len(OutputsFolder(tmp_path / "outputs").runs()) == 1 and not partial.exists()


def test_a_deleted_damaged_or_stale_index_is_rebuilt_with_every_run(save, tmp_path):
    outputs = OutputsFolder(tmp_path / "outputs")
    saved = [save(outputs, seed=seed) for seed in (1, 2, 3)]
    newest_first = [run.id for run in reversed(saved)]
    assert [run.id for run in outputs.runs()] == newest_first
    index = tmp_path / "outputs" / INDEX
    index.unlink()
    assert [run.id for run in OutputsFolder(tmp_path / "outputs").runs()] == newest_first
    index.write_bytes(b"not a database" * 100)
    assert [run.id for run in OutputsFolder(tmp_path / "outputs").runs()] == newest_first
    with sqlite3.connect(index) as db:  # another schema
        db.execute("PRAGMA user_version = 99")
    assert [run.id for run in OutputsFolder(tmp_path / "outputs").runs()] == newest_first
    index.write_bytes(index.read_bytes()[:100])  # damaged while the app runs: rebuilt at the next query
    assert [run.id for run in outputs.runs()] == newest_first
    # stale: a run folder copied in by hand is found at the next start, one deleted by hand leaves the list
    shutil.copytree(saved[0].folder, saved[0].folder.with_name(saved[0].id + "-copy"))
    shutil.rmtree(saved[1].folder)
    assert sorted(run.id for run in OutputsFolder(tmp_path / "outputs").runs()) == sorted(
        [saved[0].id, saved[0].id + "-copy", saved[2].id])
    assert saved[1].id not in [run.id for run in outputs.runs()]


def test_search_and_filters(save, tmp_path):
    outputs = OutputsFolder(tmp_path / "outputs")
    save(outputs, prompt="A Red Circle", seed=1)
    save(outputs, prompt="100% blue_square", seed=2, model="other")
    save(outputs, prompt="green", negative_prompt="red", seed=3)
    seeds = lambda **kw: [run.settings["seed"] for run in outputs.runs(**kw)]  # noqa: E731
    assert seeds(search="red") == [3, 1]  # any case, prompt or negative prompt
    assert seeds(search="0% blue_") == [2] and seeds(search="_") == [2] and seeds(search="%") == [2]  # literally
    assert seeds(model="other") == [2] and seeds(mode="img2img") == [] and seeds(mode="txt2img") == [3, 2, 1]
    assert outputs.models() == ["micro", "other"]


def test_pruning_drops_the_oldest_steps_first_and_final_images_last(save, tmp_path):
    outputs = OutputsFolder(tmp_path / "outputs")
    b = save(outputs, seed=1)
    a = save(outputs, seed=2, status="stopped", steps=2)
    c = save(outputs, seed=3)
    d = save(outputs, seed=4)
    with sqlite3.connect(tmp_path / "outputs" / INDEX) as db:
        rows = db.execute("SELECT id, step_bytes, keep_bytes FROM runs").fetchall()
    size = {run_id: (step, kept) for run_id, step, kept in rows}
    total = sum(step + kept for step, kept in size.values())
    assert all(step > 0 and kept > 0 for step, kept in size.values())

    outputs.max_bytes = total - size[b.id][0]  # B's steps are enough
    notes = outputs.prune(keep=d.id)
    assert notes == [f"The outputs folder {outputs.root} was over --outputs-max-gb {outputs.max_bytes / 1e9:g}: "
                     f"removed the steps of the 1 oldest run(s), their final images kept: {b.id}. It holds "
                     f"{outputs.max_bytes / 1e9:.3g} GB now (was {total / 1e9:.3g} GB)."]
    runs = {run.id: run for run in outputs.runs()}
    assert runs.keys() == {a.id, b.id, c.id, d.id}
    assert not runs[b.id].has_steps and runs[b.id].final.is_file() and not (b.folder / "steps").exists()
    assert runs[b.id].tensors is None and not list(b.folder.glob("*.safetensors"))
    with pytest.raises(OutputsError, match="This run's steps cannot be reopened: they were pruned on "):
        outputs.load_frames(runs[b.id])
    assert all(runs[r].has_steps for r in (a.id, c.id, d.id))

    outputs.max_bytes = total - size[b.id][0] - 1  # then the stopped run A: all it has is steps
    before, after = total - size[b.id][0], total - size[b.id][0] - sum(size[a.id])
    assert outputs.prune(keep=d.id) == [f"The outputs folder {outputs.root} was over --outputs-max-gb "
                                        f"{outputs.max_bytes / 1e9:g}: deleted the 1 oldest run(s) whole: {a.id}. "
                                        f"It holds {after / 1e9:.3g} GB now (was {before / 1e9:.3g} GB)."]
    assert {run.id for run in outputs.runs()} == {b.id, c.id, d.id} and not a.folder.exists()

    outputs.max_bytes = sum(size[d.id])  # only the newest fits: C's steps, then B and C whole, oldest first
    notes = outputs.prune(keep=d.id)
    assert [note.split(": ", 1)[1].split(".")[0] for note in notes] == [
        f"removed the steps of the 1 oldest run(s), their final images kept: {c.id}",
        f"deleted the 2 oldest run(s) whole: {b.id}, {c.id}"]
    assert [run.id for run in outputs.runs()] == [d.id] and outputs.runs()[0].has_steps


def test_a_prune_that_fails_leaves_every_run_whole(save, tmp_path, monkeypatch):
    outputs = OutputsFolder(tmp_path / "outputs", max_bytes=1)
    old, new = save(outputs, seed=1), save(outputs, seed=2)
    record = (old.folder / "run.json").read_bytes()
    monkeypatch.setattr("pipelines.outputs.os.replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OutputsError, match="could not prune .* the disk is full"):
        outputs.prune(keep=new.id)
    monkeypatch.undo()
    assert (old.folder / "run.json").read_bytes() == record and not list(old.folder.glob(".*"))
    assert len(outputs.load_frames(outputs.get(old.id))) == 3


def test_reopened_frames_equal_the_frames_the_run_made(made, save, tmp_path):
    """Field by field, what the timeline and the tensors file read."""
    _, frames, _ = made
    outputs = OutputsFolder(tmp_path / "outputs")
    run = save(outputs)
    back = OutputsFolder(tmp_path / "outputs").load_frames(OutputsFolder(tmp_path / "outputs").get(run.id))
    assert len(back) == len(frames)
    for a, b in zip(frames, back, strict=True):
        assert (a.step, a.total, a.view, a.timestep, a.noise_level, a.sigma, a.seconds, a.tokens) == \
               (b.step, b.total, b.view, b.timestep, b.noise_level, b.sigma, b.seconds, b.tokens)
        for name in ("xt_pixels", "x0_pixels", "latents", "x0", "noise_pred", "noise_pred_text", "noise_pred_uncond"):
            assert np.array_equal(getattr(a, name).tensor().numpy(), getattr(b, name).tensor().numpy()), name
        assert np.array_equal(pixels(a.image), pixels(b.image))
    assert np.array_equal(frames[0].start_pixels.tensor().numpy(), back[0].start_pixels.tensor().numpy())
    assert np.array_equal(frames[0].start_latents.tensor().numpy(), back[0].start_latents.tensor().numpy())
    assert back[0].schedule_levels() == frames[0].schedule_levels()
    assert Image.open(run.thumb).size == (64, 64)


def test_pruning_skips_a_run_deleted_by_hand(save, tmp_path):
    outputs = OutputsFolder(tmp_path / "outputs")
    gone, old, new = save(outputs, seed=1), save(outputs, seed=2), save(outputs, seed=3)
    shutil.rmtree(gone.folder)
    outputs.max_bytes = 1
    assert outputs.prune(keep=new.id)[-1].split(": ", 1)[1].startswith(f"deleted the 1 oldest run(s) whole: {old.id}.")
    assert [run.id for run in outputs.runs()] == [new.id]
