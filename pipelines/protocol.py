"""What passes between a run and the UI, with no torch behind it: the run's stop flag,
its final result and the errors a user can act on. ui/ imports these; generate.py and
cache.py raise and return them."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from PIL import Image

from .request import GenerationRequest


class CancelToken:
    """Stop flag for one run. Each run has its own; nothing here is process-wide."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run is cancelled (or `timeout` seconds pass); whether it is."""
        return self._event.wait(timeout)


class GenerationError(RuntimeError):
    """A run failed in a way the user can act on; the message says how."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do about it."""


@dataclass
class Final:
    image: Image.Image
    request: GenerationRequest
    model: str
    seconds: float
    notes: tuple[str, ...] = ()  # what was coerced or cut on the way in
