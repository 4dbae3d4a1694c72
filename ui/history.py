"""The History: every run saved in the outputs folder (`pipelines.outputs`), newest first, with a
search over prompts and filters by mode and model. "Open in Inspect" brings a past run's steps
back into the session's runs, so the timeline scrubs, compares and exports it, after a restart too."""

from __future__ import annotations

import html
import os
import shutil
import uuid

import gradio as gr

from pipelines.outputs import OutputsError, OutputsFolder, SavedRun
from pipelines.request import MODES

from .events import KEEP_SESSION_RUNS
from .stream import RunStore

SHOWN = 120  # runs the gallery lists, newest first; a search or a filter reaches older ones
ALL = "All"
# A browser's History key: a random id in its localStorage (gr.BrowserState), under fixed names so
# that it outlives an app restart. The "secret" is sent to the page, so it hides nothing: what keeps
# one user's runs from another is the key's randomness (uuid4, 122 bits).
KEY_STORAGE, KEY_SECRET = "stepwise-history-key", "stepwise-history"


class History:
    """The History panel's components and handlers over `outputs`. With `private` (a shared
    deployment: --share or a Space, without --shared-history) each user sees only their own runs:
    a user is the --auth username, else the browser's key. Reopened runs join the session's runs
    in `store`, as a run does. Thumbnails are served from copies beside the store's runs (in Gradio's
    cache): the outputs folder itself is never served (its index lists every user's runs)."""

    def __init__(self, outputs: OutputsFolder, store: RunStore, private: bool):
        self.outputs = outputs
        self.store = store
        self.private = private
        self.thumbs = store.root.with_name(f"{store.root.name}-history")

    def render(self, demo: gr.Blocks, runs: gr.State, owner: gr.State, events: list, private: dict):
        """The panel, where the layout calls it. `runs`: the session's run ids; `owner`: the session's
        user (set here on load, an input of the run events); `events`: the run events, after which
        the list refreshes; `private`: the keyword arguments of the page's own events. Returns the
        Open in Inspect event, for the timeline to follow (it updates `runs`)."""
        key = gr.BrowserState(None, storage_key=KEY_STORAGE, secret=KEY_SECRET)
        with gr.Accordion("History: every saved run, newest first", open=True, elem_id="history"):
            gr.Markdown(f"Every run is saved in `{self.outputs.root}`" + (
                " · you see only your own runs" if self.private else ""), elem_id="history-where")
            with gr.Row():
                search = gr.Textbox(label="Search prompts", placeholder="a word of the prompt or negative prompt",
                                    scale=3, elem_id="history-search")
                mode = gr.Dropdown([ALL, *MODES], value=ALL, label="Mode", scale=1, elem_id="history-mode")
                model = gr.Dropdown([ALL], value=ALL, label="Model", scale=1, elem_id="history-model")
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=80, elem_id="history-refresh")
            gallery = gr.Gallery(label="Saved runs", columns=8, height="auto", allow_preview=False,
                                 object_fit="contain", elem_id="history-gallery")
            with gr.Row():
                details = gr.Markdown("Click a run to see its settings.", elem_id="history-info")
                reopen = gr.Button("Open in Inspect", variant="primary", scale=0, min_width=160,
                                   elem_id="history-open")
        listed = gr.State([])  # the ids the gallery shows, in its order
        chosen = gr.State(None)  # the id of the run clicked
        listing = dict(fn=self.list, inputs=[search, mode, model, owner, chosen],
                       outputs=[gallery, listed, model, chosen, details], **private)
        demo.load(self.user, inputs=[key], outputs=[key, owner], **private).then(**listing)
        for event in events:
            event.then(**listing)
        search.submit(**listing)
        mode.input(**listing)
        model.input(**listing)
        refresh.click(**listing)
        gallery.select(self.pick, inputs=[listed], outputs=[chosen, details], **private)
        return reopen.click(self.open, inputs=[listed, chosen, runs], outputs=[runs], **private)

    @staticmethod
    def user(key, request: gr.Request) -> tuple[str, str]:
        """The browser's key (a new one for a new browser) and the session's user: the --auth
        username, else that key."""
        if not (isinstance(key, str) and len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
            key = uuid.uuid4().hex
        return key, request.username or key

    def list(self, search: str, mode: str, model: str, owner: str | None, chosen: str | None):
        """The gallery of runs that match, their ids, the model filter's choices, the run still
        picked (None when it is no longer listed) and its details."""
        if self.private and not owner:  # the page has not said who it is yet
            return [], [], gr.skip(), None, "No user yet: reload the page."
        mine = owner if self.private else None
        try:
            found = self.outputs.runs((search or "").strip(), None if mode == ALL else mode,
                                      None if model == ALL else model, mine, SHOWN)
            models = self.outputs.models(mine)
        except OutputsError as err:
            gr.Warning(str(err), title="History not read")
            return [], [], gr.skip(), None, html.escape(str(err))
        shown = [(run, self._thumb(run)) for run in found]
        found = [run for run, thumb in shown if thumb is not None]
        gallery = [(thumb, run.caption) for run, thumb in shown if thumb is not None]
        ids = [run.id for run in found]
        picked = chosen if chosen in ids else None
        models_shown = gr.Dropdown(choices=[ALL, *models], value=model if model in models else ALL)
        if picked is not None:
            note = _details(found[ids.index(picked)])
        elif found:
            note = f"{len(found)} run{'s' if len(found) > 1 else ''} · click one to see its settings."
        else:
            note = "No saved run matches." if search or mode != ALL or model != ALL else (
                "No saved run yet: every run you make lands here.")
        return gallery, ids, models_shown, picked, note

    def pick(self, listed: list[str], event: gr.SelectData):
        """The clicked run's id and its details."""
        run_id = listed[event.index] if listed and 0 <= event.index < len(listed) else None
        run = self._get(run_id)
        if run is None:
            return None, "That run is gone from the outputs folder: Refresh."
        return run.id, _details(run)

    def open(self, listed: list[str], chosen: str | None, runs: list | None, request: gr.Request) -> list:
        """Load the picked run's steps into the session's runs (the newest; the oldest past
        KEEP_SESSION_RUNS leaves memory, as after a run); the timeline then shows it."""
        run = self._get(chosen) if chosen in (listed or []) else None
        if run is None:
            raise gr.Error("Pick a run first: click its picture in the History, then Open in Inspect.",
                           title="No run picked")
        try:
            frames = self.outputs.load_frames(run)
        except OutputsError as err:
            raise gr.Error(str(err), title="Cannot open this run") from None
        view = self.store.restore(run.request(), request.session_hash, frames, run.caption.split(" · ")[0])
        if run.tensors is not None and run.tensors.is_file():  # served from the run's cache folder, as a live run's
            view.tensors = str(shutil.copyfile(run.tensors, view.folder / run.tensors.name))
        before = list(runs or [])
        runs = [*before, view.id][-KEEP_SESSION_RUNS:]
        self.store.drop([i for i in before if i not in runs], "It left its session's newest runs.")
        gr.Info(f"{run.id}: its {len(frames)} steps are in Inspect: scrub, compare, export.", title="Opened")
        return runs

    def _thumb(self, run: SavedRun) -> str | None:
        """The run's thumbnail, copied into `thumbs` once (again after Gradio's cache sweep took it);
        None when the run has none (its files were changed by hand)."""
        served = self.thumbs / f"{run.id}.jpg"
        if served.is_file():
            return str(served)
        if run.thumb is None or not run.thumb.is_file():
            return None
        temp = served.with_name(f".{served.name}.{uuid.uuid4().hex[:8]}")  # two sessions may copy at once
        try:
            self.thumbs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run.thumb, temp)
            os.replace(temp, served)
        except OSError as err:
            gr.Warning(f"Could not copy the thumbnail of {run.id} to serve it: {err}", title="History")
            return None
        return str(served)

    def _get(self, run_id: str | None) -> SavedRun | None:
        if run_id is None:
            return None
        try:
            return self.outputs.get(run_id)
        except OutputsError as err:
            raise gr.Error(str(err), title="History not read") from None


def _details(run: SavedRun) -> str:
    """The run's settings, status and folder, as markdown."""
    s, steps = run.settings, run.record["steps"]
    text = [f"**{s['mode']}** · seed `{s['seed']}` · {s['steps']} steps · {s['scheduler']} · CFG {s['guidance_scale']}"
            f" · {s['width']}x{s['height']}" + (f" · strength {s['strength']}" if "strength" in s else "")
            + f" · {html.escape(str(run.record['model']))} · {run.caption.split(' · ')[0]}"]
    text.append(f"Prompt: {html.escape(s['prompt']) or '(empty)'}")
    if s.get("negative_prompt"):
        text.append(f"Negative prompt: {html.escape(s['negative_prompt'])}")
    if run.status == "stopped":
        text.append(f"Stopped at step {steps['saved']}/{steps['total']}.")
    if not run.has_steps:
        text.append("Its steps are gone (" + ("pruned to keep the outputs within --outputs-max-gb" if
                    run.record.get("pruned") else steps.get("missing") or "not saved") + "): only its picture stays.")
    text.append(f"Folder: `{run.folder}`")
    return "\n\n".join(text)
