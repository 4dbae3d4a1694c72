"""Every offered sampler works at every offered step count on every shipped model."""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from pipelines import Final, Frame, GenerationRequest, generate
from pipelines.schedulers import make_scheduler

MICRO = Path(__file__).resolve().parents[1] / "models" / "micro"


def micro_config() -> dict:
    return json.loads((MICRO / "scheduler" / "scheduler_config.json").read_text())


def test_trailing_spacing_runs_exactly_the_steps_asked_for():
    """diffusers 0.42.1's "trailing" spacing adds a timestep -1 at 61 steps (and 103, 121, 122)."""
    config = micro_config()
    shipped = DDIMScheduler.from_config(config)
    shipped.set_timesteps(61)
    assert len(shipped.timesteps) == 62 and shipped.timesteps[-2:].tolist() == [15, -1]
    for name in ("DDIM", "Euler", "Euler a", "UniPC"):
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(61)
        assert scheduler.timesteps[-2:].tolist() == [32, 15] and len(scheduler.timesteps) == 61, name
        if hasattr(scheduler, "sigmas"):  # one per timestep, then 0; sigma(15) = sqrt((1 - a) / a), a = alphas_cumprod[15]
            sigma_15 = ((1 - scheduler.alphas_cumprod[15]) / scheduler.alphas_cumprod[15]) ** 0.5
            assert len(scheduler.sigmas) == 62 and scheduler.sigmas[-1] == 0, name
            assert torch.isclose(scheduler.sigmas[-2], sigma_15, rtol=1e-4), name


def run(cache, source, name, steps, seed=0):
    """One txt2img run through `generate` at 64x64: the final image as float pixels (H, W, 3), 0..255.

    Every frame's latents and x0 must be finite (a NaN would decode to a flat black image).
    """
    req = GenerationRequest(mode="txt2img", prompt="a red circle on the left, blue background", seed=seed,
                            steps=steps, guidance_scale=4.0, width=64, height=64, scheduler=name)
    out = list(generate(req, cache, source=source))
    frames = [o for o in out if isinstance(o, Frame)]
    (final,) = [o for o in out if isinstance(o, Final)]
    assert len(frames) == steps + (name == "PNDM" and steps > 1), (name, steps, len(frames))
    assert all(torch.isfinite(f.latents.tensor()).all() and torch.isfinite(f.x0.tensor()).all() for f in frames)
    return np.asarray(final.image, dtype=np.float64)


def test_ddim_at_61_steps_makes_the_picture_60_steps_make(cache):
    """The scrambled image the stray timestep -1 gave the bundled model (measured 118 from 60 steps)."""
    assert np.abs(run(cache, str(MICRO), "DDIM", 61) - run(cache, str(MICRO), "DDIM", 60)).mean() < 1.0
