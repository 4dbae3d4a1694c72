"""Library noise that tells a user nothing to act on, kept off the terminal of the app and of its
generation process (`pipelines.child`). Imports no library itself, so it can run before they load."""

from __future__ import annotations

import logging
import warnings


def quiet_imports() -> None:
    """Before transformers loads: it warns once per image processor that it falls back to PIL without
    torchvision; PIL is what we want (torchvision would add a GB for nothing)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())


def quiet_runs() -> None:
    """One load, not a screen of progress bars; and no warning at the first depth run on a CPU, where
    diffusers' depth2img runs the depth estimator under torch.autocast(device, dtype) for fp16 and torch
    warns, in float32, that it turns autocast off, which is what should happen."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", "In CPU autocast, but the target dtype is not supported", UserWarning)
