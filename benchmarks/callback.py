"""What the step callback does on the denoising thread, seen from outside the run."""

from __future__ import annotations

import contextlib
import functools
import importlib
import time


@contextlib.contextmanager
def wrapped_step_callbacks(wrap):
    """Runs started in the block (`pipelines.generate`) call their step callback as `wrap(callback)`
    returns it, on the denoising thread. The per-run pipeline gets a subclass whose `__call__` wraps
    the callback it is given (its signature, which the run reads, kept)."""
    module = importlib.import_module("pipelines.generate")  # the module: `pipelines.generate` is the function
    per_run = module._per_run

    def wrapped_per_run(shared, scheduler):
        pipe = per_run(shared, scheduler)
        cls = type(pipe)

        @functools.wraps(cls.__call__)
        def call(self, *args, callback_on_step_end=None, **kwargs):
            return cls.__call__(self, *args, callback_on_step_end=wrap(callback_on_step_end), **kwargs)

        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": call})
        return pipe

    module._per_run = wrapped_per_run
    try:
        yield
    finally:
        module._per_run = per_run


def timed_callback(times: list[float]):
    """A `wrapped_step_callbacks` wrap that appends each call's seconds (its own wall time on the
    denoising thread; on CUDA what the host spends, not the GPU) to `times`."""
    def wrap(callback):
        def timed(*args):
            start = time.perf_counter()
            out = callback(*args)
            times.append(time.perf_counter() - start)
            return out

        return timed

    return wrap
