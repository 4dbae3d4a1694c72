"""Where models run, in what precision, with which attention kernel."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given, else cuda, then mps, then cpu."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp16 on CUDA; fp32 elsewhere (CPU fp16 is slow, MPS fp16 gives NaNs in some VAEs)."""
    if requested:
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    return torch.float16 if device.type == "cuda" else torch.float32


def memory_bytes(device: torch.device) -> int:
    """Total memory of the device that would hold the weights."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def use_fastest_attention(pipe, device: torch.device) -> str:
    """PyTorch SDPA is diffusers' default. xformers only on CUDA, only where it is
    installed and actually runs (it has no CPU kernels and warns on import when its
    build does not match torch), so it is imported nowhere else."""
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        return "sdpa"
    try:
        pipe.enable_xformers_memory_efficient_attention()  # runs a probe kernel, raises if unusable
    except Exception as err:  # noqa: BLE001 - any failure means: stay on SDPA
        log.warning("xformers is installed but unusable here (%s); using PyTorch SDPA", err)
        return "sdpa"
    return "xformers"
