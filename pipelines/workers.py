"""Generation on Ray Serve: replicas that each own a `ModelCache` stream every step back to the front.

Imported only with `--workers` or `--ray-address` (app.py); importing it imports ray. The Gradio app
stays the one page and API: its `generate` function becomes `Workers.generate`, which sends the
validated request to a replica of the `Generator` deployment and yields the same `Frame`s and `Final`
as `pipelines.generate`, rebuilt from compact messages (`pipelines.wire`), one per step, as they are
made.

- Routing: each run names its checkpoint as Serve's multiplexed model id, so Serve sends it to a
  replica that already holds that checkpoint when one has it (`serve.multiplexed`).
- Queueing: a replica takes `RUNS_PER_REPLICA` runs at once and runs one at a time (the cache's
  `run_lock`): the second waits there and starts the moment the first ends, instead of after the
  router's round trip (measured on Ray Serve 2.60: with one at a time a replica idled 8-25% between
  runs; ../shared/reference/FACTS.md). The front lets `RUNS_PER_REPLICA` runs per replica out of its
  queue.
- Stop: the front cancels the run's Serve request; the replica's request task gets CancelledError and
  sets the run's CancelToken, so the pipeline stops after its current step.
- A replica that dies: the run on it ends with `GenerationError` (its frames so far stay shown), the
  next run goes to a live replica, and Serve starts a new one (about 14 s here).
Untested here: GPU replicas, a multi-node cluster (this machine has 2 CPU cores and no GPU) and
routing between checkpoints. A risk there: a replica's second run loads its checkpoint (a checkpoint
switch) or estimates depth outside `run_lock`, so on a GPU that can overlap the first run's denoising.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RequestCancelledError

from . import wire
from .cache import ModelCache
from .devices import app_cpu_threads
from .generate import generate
from .protocol import CancelToken, Final, GenerationError
from .request import GenerationRequest

log = logging.getLogger("stepwise.workers")

APP = "stepwise"  # each front's Serve application is named APP-HOST-PID on the cluster
RUNS_PER_REPLICA = 2  # one running, one waiting at the replica (see the module docstring)
CHECKPOINTS_PER_REPLICA = 2  # Serve's multiplexing keeps this many checkpoint ids per replica, least recently used out
ROOT = Path(__file__).resolve().parent.parent  # the app's folder: replicas import `pipelines` from it


@serve.deployment(max_ongoing_requests=RUNS_PER_REPLICA)
class Generator:
    """One replica: a process with its own `ModelCache` on its own device, running one run at a time."""

    def __init__(self, cache_options: dict, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.cache = ModelCache(**cache_options)

    @serve.multiplexed(max_num_models_per_replica=CHECKPOINTS_PER_REPLICA)
    async def checkpoint(self, source: str) -> str:
        """Load `source` into this replica's cache (its first run here waits for it); Serve then routes
        that checkpoint's runs here."""
        await asyncio.to_thread(self.cache.checkpoint, source)
        return source

    async def generate(self, request: GenerationRequest):
        """`pipelines.generate` on the multiplexed checkpoint, as `wire` messages; an error a user can act
        on is the last message."""
        cancel = CancelToken()
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue = asyncio.Queue()

        def relay(source: str) -> None:  # the run's own thread: the pipeline blocks, the event loop must not
            wire.relay(generate(request, self.cache, cancel, source=source),
                       lambda msg: loop.call_soon_threadsafe(messages.put_nowait, msg))

        try:
            source = await self.checkpoint(serve.get_multiplexed_model_id())
        except Exception as err:  # noqa: BLE001 - a checkpoint that cannot load is the user's to fix
            yield wire.error(err)
            return
        threading.Thread(target=relay, args=(source,), name="stepwise-relay", daemon=True).start()
        try:
            while (msg := await messages.get()) is not None:
                yield msg
        finally:
            cancel.cancel()  # the front stopped the run or went away: the pipeline stops after its current step


class Workers:
    """The front's side: Ray started here (`address` None: a local instance on this machine) or joined
    (`address`: an existing cluster), the `Generator` deployment with `replicas` replicas, and runs on it.

    `cache_options` are `ModelCache`'s arguments, the same on every replica. On CUDA each replica takes
    one GPU; on CPU one CPU and `threads` intra-op threads (default: `app_cpu_threads` of this machine's
    cores over the replicas: one on a 2-core machine, whatever the replicas). Raises GenerationError when
    Ray cannot start or the replicas cannot be placed.
    """

    def __init__(self, cache_options: dict, replicas: int | None = None, address: str | None = None,
                 threads: int | None = None):
        device, self.local = cache_options.get("device"), address is None
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env |= {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "OMP_WAIT_POLICY") if k in os.environ}
        try:
            if address is None:  # a local instance: room for every replica, whatever the core count
                ray.init(num_cpus=max(os.cpu_count() or 1, replicas or 1), runtime_env={"env_vars": env},
                         include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING)
            # the replicas' device: the one asked for, else GPUs where the cluster has them
            resources = ray.cluster_resources()
            gpu = str(device).startswith("cuda") if device else resources.get("GPU", 0) > 0
            kind = "GPU" if gpu else "CPU"
            free = int(resources.get(kind, 0))
            if replicas is None:  # from the cluster: a replica per GPU, else per CPU
                replicas = max(1, free)
            if free < replicas:  # Serve would wait for them for ever
                raise ValueError(f"{replicas} replicas need {replicas} {kind}s and the Ray cluster has {free}")
            if threads is None and not gpu:  # the app's own rule, on this machine's share of cores per replica
                threads = app_cpu_threads(max(1, (os.cpu_count() or 1) // replicas))
            self.replicas = replicas
            self.concurrency = replicas * RUNS_PER_REPLICA  # runs the front lets out of its queue at once
            deployment = Generator.options(
                num_replicas=replicas,
                ray_actor_options={"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1})
            serve.start(proxy_location="Disabled")  # the Gradio front is the only way in: no Serve HTTP proxy
            # one Serve application per front, so two fronts on one cluster keep their own replicas
            self.app = f"{APP}-{socket.gethostname()}-{os.getpid()}"
            self.handle = serve.run(deployment.bind(cache_options, threads), name=self.app, route_prefix=None)
        except (RuntimeError, ConnectionError, ValueError) as err:
            raise GenerationError(f"could not start the Ray Serve workers ({err}); check --ray-address, "
                                  "or run without --workers") from err
        log.info("Ray Serve: %d generation replica(s) on %s", replicas, "GPUs" if gpu else "CPUs")

    def generate(self, request: GenerationRequest, cancel: CancelToken, source: str) -> Iterator:
        """As `pipelines.generate(request, cache, cancel, source=source)`, on a replica: `Frame`s then one
        `Final`; nothing more after `cancel` (the replica stops after its current step). Raises
        GenerationError when the replica dies mid-run, and the errors the run raised there."""
        stream = self.handle.options(stream=True, multiplexed_model_id=source).generate.remote(request)
        ended = threading.Event()

        def stop_when_cancelled() -> None:  # Stop reaches the replica at once, not at the next frame
            cancel.wait()
            if not ended.is_set():
                stream.cancel()

        threading.Thread(target=stop_when_cancelled, name="stepwise-stop", daemon=True).start()
        reader, step = wire.Reader(request, source), 0
        try:
            for msg in stream:
                item = reader.read(msg)
                step = getattr(item, "step", step)
                if isinstance(item, Final):  # the run is whole: its consumer may stop reading here
                    ended.set()
                yield item
        except (RequestCancelledError, asyncio.CancelledError):
            if not cancel.cancelled:
                raise GenerationError("the Ray cluster cancelled this run; run it again") from None
        except RayActorError as err:
            raise GenerationError(
                f"the worker running this run stopped at step {step} ({type(err).__name__}: its process died); "
                "the steps so far stay. Generate again: another worker takes the run while Ray Serve restarts "
                "the lost one.") from None
        finally:
            cancel.cancel()  # as generate's own: wakes the watcher, which stops the replica's run unless it ended

    def shutdown(self) -> None:
        """Leave Ray: a local instance stops with its replicas; on a cluster this front's Serve application
        is deleted first (its replicas would outlive the front, holding their devices)."""
        if not self.local:
            serve.delete(self.app)
        ray.shutdown()
