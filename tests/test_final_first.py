"""The final image goes out as soon as it is made: the run's folder in the outputs is written after it,
and the event ends once that folder is written (or says why it was not)."""

import threading
import time

import gradio as gr
from gradio_client import Client

import app as app_module
from pipelines.outputs import OutputsFolder
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
    assert len(shown[OUT["gallery"]]) == RUN["steps"]  # every step
    assert job.outputs()[-1] == shown and updates[-1] == shown


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
