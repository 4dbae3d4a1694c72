"""The plain names a run picks from, with no torch or diffusers behind them, so that
ui/ and request validation can list them without loading a model library.

`schedulers.SCHEDULERS` maps each of `SCHEDULER_NAMES` to its diffusers class (and
checks at import that its keys are exactly these, in this order)."""

PREVIEW_MODES = ("latent-rgb", "tiny-vae", "full-vae")  # cheapest first; see previews.py
VIEWS = ("x_t", "x0")  # the step's latents, or the scheduler's estimate of the final ones
# AUTOMATIC1111's sampler names; the menu order
SCHEDULER_NAMES = ("DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "PNDM")
