"""The samplers the app offers, by their AUTOMATIC1111 names, and which of them fit a checkpoint.

Every run builds its own instance from the checkpoint's scheduler config:
schedulers keep per-run state (step index, solver history) and are not thread-safe.

Not every sampler fits every noise schedule: `scheduler_menu` reads the checkpoint's
scheduler config and says which names to offer and, for each other name, why not.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .choices import SCHEDULER_NAMES

# name -> (class, overrides on top of the checkpoint's config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "DDIM": (DDIMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    # the checkpoint's own timestep spacing; the diffusers docs' table maps A1111's "DPM++ 2M" to this
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "choices.SCHEDULER_NAMES lists the menu; keep it in step with SCHEDULERS"
# Flow-matching models (SD 3, Flux) predict a velocity; their "Euler" is diffusers' flow-matching Euler,
# the scheduler those checkpoints ship with. The noise-prediction samplers above cannot run them.
FLOW_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "Euler": (FlowMatchEulerDiscreteScheduler, {}),
}

# The config keys that define the noise schedule (alphas_cumprod) a model was trained on.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")

# Samplers that cannot start part-way through the schedule (img2img, depth2img: strength < 1).
# PLMS spends two UNet calls on its first step (diffusers repeats a timestep for it); img2img
# slices the timesteps as if it did not, so the pair no longer lines up with the latents' noise
# level and every later step starts from the wrong timestep (measured with an exact denoiser:
# latents off by 5.4 at 2 steps, 1.8 at 3, about 0.01 from 20). A1111 hides PLMS from img2img
# too (modules/sd_samplers.py, `hidden_img2img`).
_NOT_FROM_AN_IMAGE = {
    "PNDM": "PNDM (PLMS) cannot start part-way through the schedule: diffusers' img2img misaligns its "
            "two-call first step and the image comes out wrong below about 10 steps",
}


def make_scheduler(name: str, base_config, flow_matching: bool = False) -> SchedulerMixin:
    """A fresh scheduler of the named kind that keeps the checkpoint's noise schedule.
    flow_matching: the model is a flow-matching one (`Family.flow_matching`); names come from
    `FLOW_SCHEDULERS` then. Raises KeyError for a name its table lacks (`scheduler_menu` says why)."""
    cls, overrides = (FLOW_SCHEDULERS if flow_matching else SCHEDULERS)[name]
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


def scheduler_menu(config: Mapping, mode: str = "txt2img",
                   flow_matching: bool = False) -> tuple[tuple[str, ...], dict[str, str]]:
    """The sampler names that fit this checkpoint, in menu order, and why each other one does not.

    config: the checkpoint's scheduler config (`pipe.scheduler.config`, or the dict in
    `scheduler/scheduler_config.json`). mode: "txt2img", "img2img" or "depth2img".
    flow_matching: the model's `Family.flow_matching`.
    Returns (offered names, {excluded name: one-line reason}).
    Raises nothing: a sampler whose class refuses the config is excluded with diffusers' message.
    """
    offered, excluded = [], {}
    for name in SCHEDULER_NAMES:
        if flow_matching:
            reason = None if name in FLOW_SCHEDULERS else (
                f"{name} is a sampler for noise-prediction models; this model is trained for flow matching, "
                f"which runs with {', '.join(FLOW_SCHEDULERS)}")
        else:
            reason = _misfit(name, config, mode)
        if reason is None:
            offered.append(name)
        else:
            excluded[name] = reason
    return tuple(offered), excluded


def _misfit(name: str, config: Mapping, mode: str) -> str | None:
    cls, overrides = SCHEDULERS[name]
    try:
        scheduler = make_scheduler(name, config)
    except (NotImplementedError, ValueError) as err:  # e.g. a beta_schedule the class does not implement
        return f"diffusers' {cls.__name__} cannot run this model's schedule: {err}"
    # from_config ignores options a class does not take (it only stores them): such a scheduler
    # samples a noise schedule the model was not trained on (PNDMScheduler has no rescale_betas_zero_snr)
    takes = inspect.signature(cls.__init__).parameters
    dropped = [k for k in _SCHEDULE_KEYS if config.get(k) not in (None, False) and k not in takes]
    if dropped:
        return (f"diffusers' {cls.__name__} has no {', '.join(dropped)} option, so it would sample a noise "
                "schedule this model was not trained on")
    if overrides.get("use_karras_sigmas") and config.get("rescale_betas_zero_snr"):
        # Zero terminal SNR: alphas_cumprod[-1] is 2**-24 (diffusers), so sigma_max is 4096 and
        # Karras' rho=7 spacing puts the first steps at sigmas that all round to timestep 999.
        sigma_max = float(scheduler.sigmas.max())
        return (f"Karras sigmas do not fit a zero-terminal-SNR schedule (sigma_max {sigma_max:.0f}): many steps land "
                "on timestep 999, so diffusers fails at 21 steps and more and gives wrong colours below that")
    if mode != "txt2img" and name in _NOT_FROM_AN_IMAGE:
        return _NOT_FROM_AN_IMAGE[name]
    return None
