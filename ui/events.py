"""Gradio event handlers: validate at the edge, run, stream, stop."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
from gradio.server_messages import ProcessCompletedMessage
from gradio.utils import error_payload

from pipelines import (
    CancelToken,
    Final,
    GenerationError,
    GenerationRequest,
    Limits,
    ModelLoadError,
    RequestError,
    validate_request,
)
from pipelines.export import save_run_tensors
from pipelines.metadata import save_png
from pipelines.outputs import OutputsError, OutputsFolder

from .stream import RunStore, RunView, progress_html

GenerateFn = Callable[[GenerationRequest, CancelToken], Iterator]
KEEP_SESSION_RUNS = 4  # runs a session keeps for the timeline and comparisons
WITHDRAWN = "Stopped before it started: Stop took this run out of the queue."
# at most one step update per this many seconds: each costs Gradio's loop milliseconds of Python, which the
# denoising thread waits for through the GIL; faster steps are written and shown with the next (BENCHMARKS.md)
UPDATE_INTERVAL = 0.1


class RunUpdate(NamedTuple):
    """One update of a run event: its outputs, in order. API clients (gradio_client) get the
    same values without `runs`, a gr.State: index their results with API_OUTPUTS."""

    preview: str | None  # the newest step's frame (JPEG path)
    gallery: Any  # [(path, caption)] one per step, or gr.skip() between refreshes
    final: str | None  # the final PNG's path, once done
    status: str  # progress HTML
    info: str  # the run's settings and notes once done, or where it stopped
    tensors: str | None  # once done or stopped: the run's tensors (.safetensors path; export.save_run_tensors)
    runs: list  # the session's run ids, newest last
    depth: str | None = None  # depth2img only: the depth map used (PNG path)


API_OUTPUTS = {name: i for i, name in enumerate(n for n in RunUpdate._fields if n != "runs")}


class Runner:
    """Runs generations for a Gradio app.

    Each run has its own `CancelToken`, registered under the session that started it,
    so Stop reaches that session's run and no other. A session's runs live in `store`
    under stable ids; the session's `gr.State` holds only the ids. A session that picked
    a model (its `model` State: a source) runs on it, checked against that model's limits:
    `models(source)` gives its view (`.limits`, `.label`) and `generate` takes `model=source`.
    Every run that made a step is saved in `outputs` (None: --no-save), as its session's `owner`.
    """

    def __init__(self, generate: GenerateFn, store: RunStore, limits: Limits, model_label: str, models=None,
                 outputs: OutputsFolder | None = None):
        self.generate = generate
        self.outputs = outputs
        self.store = store
        self.limits = limits
        self.model_label = model_label
        self.models = models
        self.blocks: gr.Blocks | None = None  # set once built: Stop withdraws runs from its queue
        self._tokens: dict[str, CancelToken] = {}
        self._handlers: set = set()  # this Runner's event functions, to find their events in the queue
        self._lock = threading.Lock()
        # writes finished runs' folders while their final image goes out (`_run`)
        self._keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepwise-keep")

    def handler(self, mode: str, with_depth: bool = False):
        """The event function for one tab; keyword inputs are the API parameters."""

        def run(request: gr.Request, runs: list | None = None, model: str | None = None, owner: str | None = None,
                **fields) -> Iterator[tuple]:
            yield from self._run(mode, request, runs, fields, with_depth, model, owner)

        def run_depth(request: gr.Request, runs: list | None = None, model: str | None = None,
                      owner: str | None = None, depth_map: str | None = None, **fields) -> Iterator[tuple]:
            # the explicit `= None` makes depth_map optional for API clients
            yield from self._run(mode, request, runs, dict(fields, depth_map=depth_map), with_depth, model, owner)

        fn = run_depth if with_depth else run
        fn.__name__ = mode
        self._handlers.add(fn)
        return fn

    async def stop(self, request: gr.Request) -> str:
        """Withdraw this session's runs still waiting in the queue, and stop its running
        one after the current step. Returns what it did, for the page (`say`): Stop is not
        queued (a full queue must not refuse it), and only queued events bring a toast to
        the page. The run's own last update says where it stopped."""
        # withdraw first: once the running run stops, the next one waiting starts
        withdrawn = await self._withdraw_queued(request.session_hash)
        with self._lock:
            token = self._tokens.get(request.session_hash)
        said = []
        if token is not None:
            token.cancel()
            said.append("Stopping after this step…")
        if withdrawn:
            said.append(f"Took {withdrawn} waiting run{'s' if withdrawn > 1 else ''} out of the queue.")
        return " ".join(said) or "Nothing is running."

    async def _withdraw_queued(self, session: str | None) -> int:
        """Take `session`'s runs still waiting in Gradio's queue out of it; each one's client
        gets WITHDRAWN as the error of its run. Gradio has no public call for this: its
        /cancel route needs the event id, which only the client knows, and `cancels=` works
        in the browser only and ends a running run without its last update. So this uses
        the Queue's own attributes (gradio 6.31, pinned in requirements.txt;
        tests/test_app.py::test_stop_withdraws_the_callers_queued_run fails if they change)."""
        queue = getattr(self.blocks, "_queue", None)
        if queue is None or session is None:
            return 0
        withdrawn = 0
        for event_id in list(queue.pending_event_ids_session.get(session, ())):
            event = queue.event_ids_to_events.get(event_id)
            if event is None or event.fn.fn not in self._handlers:
                continue
            await queue.remove_from_queue(event_id)
            if event_id in queue.event_ids_to_events:
                continue  # it had started: its CancelToken stops it
            error = error_payload(gr.Error(WITHDRAWN, title="Stopped"), show_error=True)  # as a raised gr.Error
            queue.send_message(event, ProcessCompletedMessage(output=error, success=False, title="Stopped"))
            withdrawn += 1
        return withdrawn

    def _save_tensors(self, view: RunView, model: str) -> str | None:
        """Write the finished (or stopped) run's tensors beside its images (`save_run_tensors`); None, with a
        warning, when its steps already left memory (the store's bounds) or the disk refused."""
        if not view.whole:
            gr.Warning("The run's tensors were not saved: its steps left the server's memory "
                       f"({view.dropped or 'over the memory bound'}).")
            return None
        try:
            path = save_run_tensors(view.frames, view.folder / view.file_name("safetensors"),
                                    {"model": model, "settings": view.request.settings()})
        except OSError as err:
            gr.Warning(f"The run's tensors were not saved: {err}")
            return None
        view.tensors = str(path)
        view.disk_bytes += path.stat().st_size
        return view.tensors

    def _keep(self, view: RunView, model: str, status: str, owner: str | None, notes: tuple[str, ...] = (),
              folder: Path | None = None) -> str:
        """Save the run in the outputs folder (in `folder`, from `OutputsFolder.reserve`, when given) and keep
        the folder within its bound; a line for the run's info saying where, or "" (--no-save, or the disk
        refused: a warning says so)."""
        if self.outputs is None:
            return ""
        whole = view.whole
        if not whole and view.final is None:
            gr.Warning("This stopped run was not saved: its steps left the server's memory during the run "
                       f"({view.dropped or 'its bound'}).", title="Run not saved")
            return ""
        missing = None if whole else f"they left the server's memory during the run ({view.dropped or 'its bound'})"
        try:
            saved = self.outputs.save(view.request, model, view.frames if whole else [], status=status,
                                      final=view.final, tensors=view.tensors, owner=owner, notes=notes,
                                      missing_steps=missing, folder=folder)
        except OutputsError as err:
            gr.Warning(f"{_sentence(str(err))} The run's images are still in this page.", title="Run not saved")
            return ""
        try:
            for note in self.outputs.prune(keep=saved.id):
                gr.Info(note, title="Outputs pruned")
        except OutputsError as err:
            gr.Warning(_sentence(str(err)), title="Outputs not pruned")
        return _saved_in(saved.folder)

    @staticmethod
    def _outputs(view: RunView, gallery, final, status: str, info: str, runs: list, with_depth: bool,
                 tensors: str | None = None) -> tuple:
        update = RunUpdate(view.preview, gallery, final, status, info, tensors, runs, view.depth)
        return update if with_depth else update[:-1]

    def _run(self, mode: str, request: gr.Request, runs: list | None, fields: dict, with_depth: bool,
             model: str | None = None, owner: str | None = None) -> Iterator[tuple]:
        limits, label, kwargs = self.limits, self.model_label, {}
        if model is not None and self.models is not None:
            try:
                view = self.models(model)
            except ModelLoadError as err:
                raise gr.Error(str(err), title="Pick a model") from None
            limits, label, kwargs = view.limits, view.label, {"model": model}
        try:
            req = validate_request({"mode": mode, **fields}, limits)
        except RequestError as err:
            raise gr.Error(str(err), title="Check the settings") from None
        session = request.session_hash or "api"
        token = CancelToken()
        with self._lock:
            previous = self._tokens.get(session)
            if previous is not None:
                previous.cancel()  # a new Generate from the same tab supersedes the old run
            self._tokens[session] = token
        view = self.store.new_run(req, session)
        # The session's run ids, newest last: a new list, so a run that fails before its
        # first update leaves the session's State as it was.
        before = list(runs or [])
        runs = [*before, view.id][-KEEP_SESSION_RUNS:]
        # Outputs (RunUpdate) with nothing new get cheap values (None, "") rather than gr.skip(),
        # for which Gradio rebuilds the component's config (milliseconds); only the gallery,
        # whose resend grows with the run, is skipped between refreshes.
        shown = float("-inf")  # when a step update last went out
        try:
            for item in self.generate(req, token, **kwargs):
                if isinstance(item, Final):
                    final = view.final = save_png(item, view.folder / "final.png", label, limits.distilled_guidance)
                    view.disk_bytes += Path(final).stat().st_size
                    status = progress_html(view.step, view.total, f"done in {item.seconds:.2f} s", view.levels,
                                           view.flow_matching)
                    for note in item.notes:
                        gr.Warning(note)
                    info = _info(req, label, item, limits.distilled_guidance)
                    tensors = self._save_tensors(view, label)

                    def done(gallery, info=info):
                        return self._outputs(view, gallery, final, status, info, runs, with_depth, tensors)

                    # the final image goes out at once; steps whose pictures were left for later (a CPU's
                    # decodes: `RunView.save_frame`) are written after it, and the next update holds them
                    gallery = gr.skip() if view.unwritten else view.gallery
                    if self.outputs is None:
                        yield done(gallery)
                        if view.complete():
                            yield done(view.gallery)
                        return
                    # The final image goes out first; then the keeper thread writes the run's folder (every
                    # file synced: 0.1-0.5 s for the bundled model's 20 steps, the most with full-VAE previews on
                    # a CPU, whose pictures no update showed are decoded then: `pipelines.generate`). Gradio
                    # resumes this generator once it has sent the update, so the writing does not take the GIL
                    # from the update's postprocessing. The event ends once the folder is written; a client
                    # that left (the generator closed at the yield) does not stop it.
                    folder = self.outputs.reserve(req)
                    try:
                        yield done(gallery, info + _saved_in(folder))
                    finally:
                        keeping = self._keeper.submit(contextvars.copy_context().run, self._keep, view, label,
                                                      "finished", owner, item.notes, folder)
                    if view.complete():
                        yield done(view.gallery, info + _saved_in(folder))
                    if not keeping.result():  # not saved: its warning says why, and the info no longer says where
                        yield done(view.gallery)
                    return
                self.store.add_frame(view, item)
                now = time.monotonic()
                if now - shown < UPDATE_INTERVAL:
                    continue
                shown = now
                view.write_newest()
                gallery = view.gallery if view.gallery_due() else gr.skip()
                status = progress_html(view.step, view.total, f"t={item.timestep:.0f}", view.levels, view.flow_matching)
                yield self._outputs(view, gallery, None, status, "", runs, with_depth)
            # the frames ended without a final image: the run was stopped
            note = f"Stopped at step {view.step}/{view.total}; the steps so far stay in the gallery."
            tensors = None
            view.complete()
            if view.step:  # the steps it made, as a finished run's
                tensors = self._save_tensors(view, label)
                note += self._keep(view, label, "stopped", owner, req.notes)
            yield self._outputs(view, view.gallery, None, progress_html(view.step, view.total, "stopped", view.levels,
                                                                         view.flow_matching),
                                note, runs if view.step else before, with_depth, tensors)
        except (ModelLoadError, GenerationError, ValueError) as err:
            raise gr.Error(str(err)) from None
        finally:
            view.ended = True
            token.cancel()
            with self._lock:
                if self._tokens.get(session) is token:
                    del self._tokens[session]
            if view.step:  # the session's list is now `runs`: the run that left it leaves memory
                self.store.drop([i for i in before if i not in runs], "It left its session's newest runs.")
            else:  # nothing of it reached the session
                self.store.forget([view.id])


def _saved_in(folder: Path) -> str:
    return f"\n\nSaved in `{folder}`"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _info(req: GenerationRequest, model: str, final: Final, distilled_guidance: bool = False) -> str:
    if req.mode == "txt2img":
        steps = f"{req.steps} steps"
    else:  # img2img and depth2img start part-way: strength sets how far
        steps = f"{req.denoising_steps} of {req.steps} steps (strength {req.strength})"
    if distilled_guidance:  # an input of the model (Flux dev), not classifier-free guidance
        cfg = f"distilled guidance {req.guidance_scale}"
    else:
        cfg = f"CFG {req.guidance_scale}" + ("" if req.classifier_free_guidance else " (off: 1 or below)")
    notes = "".join(f"\n\n⚠ {note}" for note in final.notes)
    return (
        f"**{req.mode}** · seed `{req.seed}` · {steps} · {req.scheduler} · {cfg}"
        f" · {req.width}x{req.height} · {model} · {final.seconds:.2f} s{notes}"
    )
