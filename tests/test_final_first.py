"""The final image goes out as soon as it is made: the run's folder in the outputs is written after it,
and the event ends once that folder is written (or says why it was not)."""

import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from gradio_client import Client
from PIL import Image

import app as app_module
from pipelines.outputs import OutputsFolder
from pipelines.previews import HostBuffers
from ui.stream import RunView
from ui.events import API_OUTPUTS as OUT

from .test_outputs import RUN, saved_folders


def test_the_final_image_does_not_wait_for_the_runs_folder(serve_tiny, tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"
    demo = serve_tiny("--outputs", str(outputs))
    release, saving = threading.Event(), threading.Event()
    save = OutputsFolder.save

    def held_save(self, *args, **kwargs):  # the folder is written only once the test has seen the final image
        saving.set()
        assert release.wait(60)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(OutputsFolder, "save", held_save)
    job = Client(demo.local_url, verbose=False, download_files=False).submit(**RUN, api_name="/txt2img")
    try:
        deadline = time.monotonic() + 60
        while not any(update[OUT["final"]] for update in job.outputs()):
            assert time.monotonic() < deadline, "no final image while the run's folder was being written"
            time.sleep(0.05)
        assert saving.wait(60) and saved_folders(outputs) == [] and not job.done()
        shown = next(update for update in job.outputs() if update[OUT["final"]])
    finally:
        release.set()
    updates = list(job)  # the rest, once the folder is written
    [folder] = saved_folders(outputs)
    assert shown[OUT["info"]].endswith(f"Saved in `{folder}`") and shown[OUT["tensors"]]["path"].endswith(".safetensors")
    last = job.outputs()[-1]  # the final update, or after it the one that holds steps decoded since (on a CPU)
    assert updates[-1] == last and len(last[OUT["gallery"]]) == RUN["steps"]  # every step
    assert [last[OUT[k]] for k in ("final", "info", "tensors")] == [shown[OUT[k]] for k in ("final", "info", "tensors")]


def test_the_folder_is_written_once_the_final_update_is_sent_even_if_the_client_left(tiny_dir, cache, tmp_path,
                                                                                     monkeypatch):
    """Gradio resumes the event's generator once it has sent an update, and closes it there when the
    client went: the folder is written only then (so not beside the final update's postprocessing),
    and still when the client left at the final image."""
    demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir), "--outputs",
                                                         str(tmp_path / "outputs")]), cache)
    saves, save = [], OutputsFolder.save
    monkeypatch.setattr(OutputsFolder, "save", lambda self, *a, **kw: saves.append(1) or save(self, *a, **kw))
    txt2img = next(f.fn for f in demo.fns.values() if f.api_name == "txt2img")
    updates = txt2img(gr.Request(session_hash="leaves"), **RUN)
    for update in updates:
        if update[OUT["final"]] is not None:
            break
    time.sleep(0.5)  # time enough for a keeper started before the yield
    assert saves == [] and saved_folders(tmp_path / "outputs") == []
    updates.close()  # the client left: GeneratorExit at the yield
    deadline = time.monotonic() + 60
    while not saved_folders(tmp_path / "outputs"):
        assert time.monotonic() < deadline, "the run's folder was not written after its client left"
        time.sleep(0.05)
    [folder] = saved_folders(tmp_path / "outputs")
    assert len(list((folder / "steps").glob("x0_*.png"))) == RUN["steps"]


def test_the_final_image_does_not_wait_for_the_pictures_of_steps_the_page_did_not_show(tiny_dir, cache, monkeypatch):
    """On a CPU a step that a newer one overtook is decoded after the final image (`pipelines.generate`) and
    its picture written then: the final update skips the gallery, and the next one holds every step."""
    checkpoint = cache.checkpoint(str(tiny_dir))
    vae, decoded = checkpoint.full_vae, []

    def slow(latents):  # slower than the tiny UNet's step, as the full VAE is on a CPU
        time.sleep(0.05)
        decoded.append(latents)
        return vae(latents)

    monkeypatch.setattr(type(checkpoint), "decoder", lambda self, preview: slow)
    demo = app_module.create_demo(app_module.parse_args(["--model", str(tiny_dir), "--no-save"]), cache)
    txt2img = next(f.fn for f in demo.fns.values() if f.api_name == "txt2img")
    updates = txt2img(gr.Request(session_hash="final-first"), **dict(RUN, steps=8))
    shown = next(update for update in updates if update[OUT["final"]] is not None)
    at_final = len(decoded)
    rest = list(updates)
    assert at_final < 8 and shown[OUT["gallery"]] == gr.skip()  # some steps' pictures were left for later
    assert len(rest) == 1 and rest[0][OUT["final"]] == shown[OUT["final"]]
    assert [Path(path).name for path, _ in rest[0][OUT["gallery"]]] == [f"step_{n:04d}.jpg" for n in range(1, 9)]


class _Shown:
    """What `RunView.save_frame` reads of a `Frame`."""

    def __init__(self, step: int, pixels):
        self.step, self.total, self.pixels, self.depth, self.schedule_t = step, 3, pixels, None, None
        self.caption = f"step {step}/3"

    @property
    def image(self):
        return self.pixels.pil()


def test_a_step_whose_picture_is_not_made_is_written_by_complete_in_its_place(tmp_path):
    host, made = HostBuffers("cpu"), []

    def picture(value: int) -> torch.Tensor:
        made.append(value)
        return torch.full((8, 8, 3), value, dtype=torch.uint8)

    steps = [host.copies({"pixels": picture(40)}, row=0, rows=3)["pixels"],
             host.deferred("pixels", lambda: picture(120), like=torch.zeros(8, 8, 3, dtype=torch.uint8), row=1, rows=3),
             host.copies({"pixels": picture(200)}, row=2, rows=3)["pixels"]]
    view = RunView(tmp_path)
    for n, pixels in enumerate(steps, 1):
        view.save_frame(_Shown(n, pixels))
    assert made == [40, 200] and view.unwritten and view.step == 3  # the stream did not decode it
    assert [Path(path).name for path, _ in view.gallery] == ["step_0001.jpg", "step_0003.jpg"]
    assert view.complete() and made == [40, 200, 120] and not view.unwritten and not view.complete()
    assert [Path(path).name for path, _ in view.gallery] == ["step_0001.jpg", "step_0002.jpg", "step_0003.jpg"]
    assert view.preview == view.gallery[-1][0] and view.gallery[1][1] == "step 2/3"
    assert abs(np.asarray(Image.open(view.gallery[1][0])).astype(int).mean() - 120) < 2  # the deferred picture


def test_an_update_writes_the_newest_step_the_run_left_and_complete_the_rest(tmp_path):
    """`RunView.write_newest`: each page update decodes the picture it shows, only that one."""
    host, made = HostBuffers("cpu"), []

    def deferred(value: int, row: int):
        def picture() -> torch.Tensor:
            made.append(value)
            return torch.full((8, 8, 3), value, dtype=torch.uint8)
        return host.deferred("pixels", picture, like=torch.zeros(8, 8, 3, dtype=torch.uint8), row=row, rows=3)

    view = RunView(tmp_path)
    view.save_frame(_Shown(1, deferred(40, 0)))
    view.save_frame(_Shown(2, deferred(120, 1)))
    view.write_newest()  # an update after step 2: its picture, not step 1's
    assert made == [120] and [Path(path).name for path, _ in view.gallery] == ["step_0002.jpg"]
    view.write_newest()  # nothing newer: nothing more to decode
    view.save_frame(_Shown(3, deferred(200, 2)))
    assert made == [120] and view.preview == view.gallery[-1][0]
    view.write_newest()
    assert made == [120, 200] and view.preview.endswith("step_0003.jpg")
    assert view.complete() and made == [120, 200, 40] and not view.unwritten
    assert [Path(path).name for path, _ in view.gallery] == ["step_0001.jpg", "step_0002.jpg", "step_0003.jpg"]
