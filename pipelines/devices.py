"""Where models run, in what precision, with which attention kernel."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given, else cuda, then mps, then cpu. Raises ValueError for a device name torch
    does not know or a CUDA device this torch build cannot see."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"device {requested!r} is not a device torch knows; use cuda, mps or cpu") from None
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


def app_cpu_threads(cores: int | None = None) -> int:
    """Intra-op threads for the app on CPU: all cores but one, which is left to the threads
    that decode and stream frames. On a 2-core VM two intra-op threads made a micro-model run
    2.4 s against 1.15 s with one (BENCHMARKS.md). OMP_NUM_THREADS, when set, wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, (cores or os.cpu_count() or 1) - 1)


def memory_bytes(device: torch.device) -> int:
    """Total memory of the device that would hold the weights."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SDPAProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, same maths. diffusers' Attention.forward calls
    inspect.signature(processor.__call__) on every call; a stored __signature__ makes that
    a lookup (it was ~7% of a 20-step micro-model run on CPU, profiled)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


SDPAProcessor.__call__.__signature__ = inspect.signature(SDPAProcessor.__call__)


def _use_sdpa(pipe) -> str:
    for model in (getattr(pipe, "unet", None), getattr(pipe, "vae", None)):
        procs = getattr(model, "attn_processors", None)
        if procs and all(type(p) is AttnProcessor2_0 for p in procs.values()):
            model.set_attn_processor(SDPAProcessor())
    return "sdpa"


def use_fastest_attention(pipe, device: torch.device) -> str:
    """PyTorch SDPA is diffusers' default. xformers only on CUDA, only where it is
    installed and actually runs (it has no CPU kernels and warns on import when its
    build does not match torch), so it is imported nowhere else."""
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        return _use_sdpa(pipe)
    try:
        pipe.enable_xformers_memory_efficient_attention()  # runs a probe kernel, raises if unusable
    except Exception as err:  # noqa: BLE001 - any failure means: stay on SDPA
        log.warning("xformers is installed but unusable here (%s); using PyTorch SDPA", err)
        return _use_sdpa(pipe)
    return "xformers"
