"""The samplers the app offers, by their AUTOMATIC1111 names.

Every run builds its own instance from the checkpoint's scheduler config:
schedulers keep per-run state (step index, solver history) and are not thread-safe.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (class, overrides on top of the checkpoint's config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "DDIM": (DDIMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def make_scheduler(name: str, base_config) -> SchedulerMixin:
    """A fresh scheduler of the named kind that keeps the checkpoint's noise schedule."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)
