"""The samplers the app offers, by their AUTOMATIC1111 names.

Every run builds its own instance from the checkpoint's scheduler config:
schedulers keep per-run state (step index, solver history) and are not thread-safe.
"""

from __future__ import annotations

import functools

import torch
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
    scheduler = cls.from_config(base_config, **overrides)
    _drop_negative_timestep(scheduler)
    return scheduler


def _drop_negative_timestep(scheduler: SchedulerMixin) -> None:
    """Wrap this instance's `set_timesteps` so that no timestep is below 0.

    diffusers' "trailing" spacing takes np.arange(1000, 0, -1000 / steps), whose float step lets
    one more value in at some step counts (61, 103, 121 and 122 of 1..150): a last timestep of -1.
    The UNet then runs once more, and DDIM reads alphas_cumprod[-1] there, the pure-noise end, so
    the bundled model's image comes out scrambled. The sigma schedulers give that timestep a sigma
    of its own (between the previous one and the final 0), dropped with it.
    """
    original = scheduler.set_timesteps

    @functools.wraps(original)  # keeps the signature: pipelines look for a `timesteps` parameter
    def set_timesteps(*args, **kwargs):
        original(*args, **kwargs)
        if scheduler.timesteps[-1] >= 0:
            return
        scheduler.timesteps = scheduler.timesteps[:-1]
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 2:  # one per timestep, then the final
            scheduler.sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        if scheduler.num_inference_steps == len(scheduler.timesteps) + 1:  # DPM-Solver, UniPC count their timesteps
            scheduler.num_inference_steps -= 1

    scheduler.set_timesteps = set_timesteps
