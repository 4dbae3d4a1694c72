"""Generation in a process of its own, so the denoiser does not share the server's GIL.

On a CPU the bundled model's UNet step is mostly Python dispatch: any Python the server runs beside
it (Gradio's event loop, the event handler, the step files) slowed it about one for one, so the
served app took 1.5-2x the bare pipeline call (BENCHMARKS.md, issue 21). `GenerationProcess` runs
`pipelines.generate` in a spawned child that holds its own `ModelCache`, and streams every step
back over a pipe as `pipelines.wire` messages, as a Ray Serve replica does (`pipelines.workers`),
without Ray: one child, one run at a time.

- Pictures: the child makes none; a step's message carries its latents, and the front makes each
  picture with its own copy of the checkpoint's decoder when first read (the same weights on the same
  kind of device: the same pixels): the page's updates read the newest step's
  (`ui.stream.RunView.write_newest`), the rest wait for the run's end.
  So the child's denoising thread shares its GIL with no decodes, and makes each step's frame itself
  (`overlap_decode=False`): with nothing to decode, a decode thread's GIL hand-offs cost it more than
  the work they moved (measured: BENCHMARKS.md, eighth session).
- Stop: the front sends the run's cancel; the child's run stops after its current step.
- A child that dies: the run on it ends with `GenerationError` (its frames so far stay shown), and
  the next run starts a new child.
- Exit: the child leaves when its connection closes: at the server's exit, or when the server dies.
  It runs in a session of its own, so Ctrl-C in the terminal reaches only the server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from .quiet import quiet_imports, quiet_runs

quiet_imports()  # `python -m pipelines.child`: before wire imports transformers

from . import wire  # noqa: E402
from .protocol import CancelToken, Final, GenerationError  # noqa: E402
from .request import GenerationRequest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the app's folder: the child runs `-m pipelines.child` from it


class GenerationProcess:
    """The front's side: the child process, started here with `ModelCache(**cache_options)`, `threads`
    intra-op threads and the checkpoint `preload` loaded, and runs on it. `decoder(source, preview)` gives
    the front's preview decoder of a checkpoint, for the pictures the child left to the front. The child
    loads while the server starts; the first run waits for it, and raises GenerationError (or the
    ModelLoadError it met) when it could not start."""

    concurrency = 1  # runs the front lets out of its queue at once

    def __init__(self, cache_options: dict, threads: int | None, decoder: Callable[[str, str], Callable],
                 preload: str | None = None):
        self.cache_options, self.threads, self.decoder, self.preload = cache_options, threads, decoder, preload
        self._lock = threading.Lock()  # one run at a time on the child's pipe
        self._runs = 0  # runs sent so far: each run's id, so a late cancel never reaches the next
        self._sending = threading.Lock()
        self._closed = False
        self._start()

    def _start(self) -> None:
        # `python -m pipelines.child`, not multiprocessing's spawn, which would import the server's
        # __main__ (app.py: Gradio and all) again in the child
        ours, theirs = socket.socketpair()
        spec = json.dumps({"cache_options": self.cache_options, "threads": self.threads, "preload": self.preload})
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.child", str(theirs.fileno()), spec], cwd=ROOT,
                pass_fds=[theirs.fileno()], start_new_session=True)  # Ctrl-C in the terminal is the server's
        self._conn = Connection(ours.detach())
        self._ready = False  # the child loads while the server starts: the first run waits for it
        self._failed = False  # it died or could not start: the next run starts a new one

    def _ready_child(self, cancel: CancelToken) -> bool:
        """A child that has loaded: a new one in place of one that failed. False when `cancel` came first
        (a load can take minutes). Raises the error a child that could not start sent."""
        if self._failed or (self._ready and self._process.poll() is not None):
            self._end_child()
            self._start()
        while not self._ready:
            if cancel.cancelled:
                return False
            try:
                waiting = self._conn.poll(0.2)
            except OSError:  # closed by shutdown()
                raise GenerationError("the server is shutting down; no new run can start") from None
            if waiting:
                ready = self._receive(0)
                if "error" in ready:
                    self._failed = True
                    wire.Reader(None, "").read(ready)  # raises what the child raised
                self._ready = True
        return True

    def generate(self, request: GenerationRequest, cancel: CancelToken, source: str) -> Iterator:
        """As `pipelines.generate(request, cache, cancel, source=source)`, in the child: `Frame`s then one
        `Final`; nothing more after `cancel` (the child stops after its current step). Raises
        GenerationError when the child dies mid-run or the server is shutting down, and the errors the
        run raised there."""
        decode = self.decoder(source, request.preview)  # before the child hears of the run: this may raise
        with self._lock:
            if self._closed:
                raise GenerationError("the server is shutting down; no new run can start")
            if not self._ready_child(cancel):
                return
            self._runs += 1
            run, ended = self._runs, threading.Event()
            self._send(("run", run, request, source))

            def stop_when_cancelled() -> None:  # Stop reaches the child at once, not at the next frame
                cancel.wait()
                if not ended.is_set():
                    self._send(("cancel", run))

            threading.Thread(target=stop_when_cancelled, name="stepwise-stop", daemon=True).start()
            reader = wire.Reader(request, source, decode)
            step, whole = 0, False
            try:
                while (msg := self._receive(step)) is not None:
                    item = reader.read(msg)
                    step = getattr(item, "step", step)
                    if isinstance(item, Final):  # the run is whole: its consumer may stop reading here
                        ended.set()
                    yield item
                whole = True
            finally:
                if not ended.is_set():
                    self._send(("cancel", run))  # here, not by the watcher: never after the next run started
                ended.set()
                cancel.cancel()  # wakes the watcher, which now sends nothing
                if not whole and self._process.poll() is None:  # the rest of this run: the pipe is the next run's
                    try:
                        while self._receive(step) is not None:
                            pass
                    except GenerationError:  # it died meanwhile: the next run starts a new one
                        pass

    def _send(self, request: tuple) -> None:
        with self._sending:  # the run's thread and its Stop watcher
            try:
                self._conn.send(request)
            except OSError:  # the child is gone: the run's reader says so
                pass

    def _receive(self, step: int):
        try:
            return self._conn.recv()
        except (EOFError, OSError, TypeError):  # TypeError: closed by shutdown() while reading
            self._failed = True
            raise GenerationError(
                f"the generation process stopped at step {step} (it died); the steps so far stay. Generate "
                "again: a new one starts.") from None

    def _end_child(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()

    def shutdown(self) -> None:
        """End the child now (the server is going: a run on it has no one to show it to); later runs
        raise GenerationError. Again is a no-op."""
        with self._sending:
            self._closed = True
        self._end_child()


def _child(conn: Connection, cache_options: dict, threads: int | None, preload: str | None) -> None:
    """The child: load the cache, say ready, then run each request as it comes and stream its messages,
    a `None` after each run's last. Leaves when the front closes its connection."""
    import torch

    from .cache import ModelCache
    from .generate import generate

    quiet_runs()

    if threads:
        torch.set_num_threads(threads)
    try:
        cache = ModelCache(**dict(cache_options, overlap_decode=False))
        if preload is not None:
            cache.checkpoint(preload)
        ready = {"ready": True}
    except Exception as err:  # noqa: BLE001 - goes to the front, which raises it
        cache, ready = None, wire.error(err)
    try:
        conn.send(ready)
    except OSError:  # the front left while this loaded
        return
    if cache is None:
        return
    current, cancel, thread = 0, CancelToken(), None

    def send(msg: dict | None, token: CancelToken) -> None:
        try:
            conn.send(msg)
        except OSError:  # the front is gone: so is the run's reader
            token.cancel()

    def relay(request: GenerationRequest, source: str, token: CancelToken) -> None:
        wire.relay(generate(request, cache, token, source=source, make_deferred=False, live=False),
                   lambda msg: send(msg, token), unmade=False)

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the front is gone
            cancel.cancel()
            return
        if request[0] == "run":
            if thread is not None:
                thread.join()  # the front sends a run once the last one's end came
            current, cancel = request[1], CancelToken()
            thread = threading.Thread(target=relay, args=(*request[2:], cancel), name="stepwise-relay")
            thread.start()
        elif request[0] == "cancel" and request[1] == current:
            cancel.cancel()


if __name__ == "__main__":  # started by GenerationProcess: the socket's descriptor, then the spec as JSON
    _spec = json.loads(sys.argv[2])
    _child(Connection(int(sys.argv[1])), _spec["cache_options"], _spec["threads"], _spec["preload"])
