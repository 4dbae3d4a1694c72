"""Turning a step's latents into a picture, and the scheduler's x0 estimate.

Three decoders, cheapest first:
- `LatentRGB`: a 4x3 linear map (+ bias) straight from latent channels to RGB at
  latent resolution; no weights, about free.
- `TinyDecoder`: an `AutoencoderTiny` (TAESD-style), when one is configured.
- `FullVAE`: the checkpoint's own VAE; exact, as costly as the final decode.

Decoders run on the device that holds the latents and return uint8 pixels there;
`HostCopy` brings them over without stalling the loop. Decoders only read
latents; they never touch the generator or the scheduler, so previews cannot
change the final image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import layout

# SD 1.x / 2.x latents -> RGB, rows = latent channels. ComfyUI's `latent_formats.SD15`
# (../shared/reference/FACTS.md); applied to raw latents, output roughly in [-1, 1].
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
# The SD VAE's config (FACTS.md): latents of a VAE built like this are SD latents.
_SD_VAE_SIGNATURE = {"latent_channels": 4, "scaling_factor": 0.18215, "block_out_channels": [128, 256, 512, 512]}


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """First image of a batch in [-1, 1], (B, 3, H, W), as uint8 (H, W, 3) on the same device."""
    return ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


class HostCopy:
    """A tensor on its way to host memory. On CUDA the copy is queued behind the
    work that produces it (pinned memory, non_blocking), so the denoising loop
    never waits for it; reading it waits, on the thread that wants it."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor.detach().contiguous()

    def tensor(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host

    def pil(self) -> Image.Image:
        return Image.fromarray(self.tensor().numpy())

    @property
    def nbytes(self) -> int:
        """Host memory the copy holds (known before it lands)."""
        return self._host.numel() * self._host.element_size()


@dataclass
class LatentRGB:
    matrix: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        matrix = self.matrix.to(latents.device, latents.dtype)
        rgb = torch.einsum("bchw,cr->brhw", latents, matrix) + self.bias.to(latents.device, latents.dtype)[:, None, None]
        return to_pixels(rgb)

    @classmethod
    def sd(cls) -> LatentRGB:
        return cls(torch.tensor(SD_LATENT_RGB), torch.zeros(3))

    @classmethod
    def from_dict(cls, data: dict) -> LatentRGB:
        """From a folder's `latent_rgb.json` ({"matrix": C x 3, "bias": 3}; see layout.py)."""
        return cls(torch.tensor(data["matrix"], dtype=torch.float32), torch.tensor(data["bias"], dtype=torch.float32))

    @classmethod
    @torch.no_grad()
    def fit(cls, vae, samples: int = 8, size: int = 16, seed: int = 0) -> LatentRGB:
        """Least-squares fit against the VAE's own decode (InvokeAI's
        generate_vae_linear_approximation.py does the same), for latent spaces with
        no published map. Random latents at the scale the pipeline uses them."""
        param = next(vae.parameters())
        generator = torch.Generator().manual_seed(seed)
        channels = vae.config.latent_channels
        latents = torch.randn(samples, channels, size, size, generator=generator) * vae.config.scaling_factor
        decoded = vae.decode(latents.to(param.device, param.dtype) / vae.config.scaling_factor).sample.float().cpu()
        decoded = torch.nn.functional.adaptive_avg_pool2d(decoded, size)
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = decoded.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(x, y).solution
        return cls(solution[:channels], solution[channels])


def latent_rgb_for(folder: Path | None, vae) -> LatentRGB:
    """The map for this checkpoint: its own file, SD's published map, or a fit."""
    data = layout.read_latent_rgb(folder) if folder is not None else None
    if data is not None:
        return LatentRGB.from_dict(data)
    if _is_sd_vae(vae.config):
        return LatentRGB.sd()
    return LatentRGB.fit(vae)


def _is_sd_vae(config) -> bool:
    # JSON configs hold lists where built ones may hold tuples
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return all(plain(config.get(k)) == v for k, v in _SD_VAE_SIGNATURE.items())


@dataclass
class VAEDecoder:
    """Full VAE (`AutoencoderKL`) or tiny one (`AutoencoderTiny`): decode like the pipeline does."""

    vae: torch.nn.Module

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return to_pixels(self.vae.decode(latents, return_dict=False)[0])


class X0Recorder:
    """Keeps the latest clean-image estimate x0 of one run's own scheduler, and
    the latents the run started from.

    `callback_on_step_end` sees only x_t after a step, so this wraps `step` on the
    run's scheduler instance (never the class, never a shared one). It takes the
    scheduler's `pred_original_sample` where it returns one (DDIM, Euler, Euler a)
    and otherwise computes x0 from the model output and the step's noise level.
    `start` is the `sample` of the first `step` call: the seed's noise for txt2img,
    the noised input image's latents for img2img and depth2img, in the scheduler's
    own space (sigma-scaled for Euler). It is only read, never changed.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.x0: torch.Tensor | None = None
        self.start: torch.Tensor | None = None
        original = scheduler.step

        # wraps() keeps the signature: pipelines pass `generator` and `eta` only to a
        # `step` that declares them, and Euler a draws its noise from that generator.
        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if self.start is None:
                self.start = sample
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            self.x0 = x0 if x0 is not None else self._x0_from_output(model_output, timestep, sample)
            return out if return_dict else (out.prev_sample,)

        scheduler.step = step

    def _x0_from_output(self, model_output, timestep, sample):
        s = self.scheduler
        if hasattr(s, "_sigma_to_alpha_sigma_t"):  # DPM++ / UniPC: `step` just moved past the sigma it used
            alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(s.sigmas[s.step_index - 1])
        else:  # PNDM and other alpha-bar schedulers
            alpha_bar = s.alphas_cumprod[int(timestep)]
            alpha_t, sigma_t = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        alpha_t, sigma_t = (v.to(sample.device, sample.dtype) for v in (torch.as_tensor(alpha_t), torch.as_tensor(sigma_t)))
        kind = s.config.prediction_type
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t.clamp(min=1e-4)
        if kind == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output  # "sample"


class NoiseSchedule:
    """Where one run's x_t stands: its noise level at the start and after each step,
    and x_t in the form every picture of it is made from.

    Position k is the run's starting latents for k = 0 and x_t after step k for
    k = 1..n (n UNet evaluations; PNDM evaluates its first timestep twice). The
    values are the scheduler's own: sigma schedulers (Euler, Euler a, DPM++, UniPC)
    keep `sigmas` on the CPU, and x_t after step k is at `sigmas[begin + k]`
    (0 after the last step); alpha-bar schedulers (DDIM, PNDM) take x_t to the next
    timestep the UNet sees, and after the last step to `final_alpha_cumprod`.
    Built in the first step callback without a host sync; levels are read later.
    """

    def __init__(self, scheduler, timesteps: torch.Tensor):
        n = len(timesteps)
        self.timesteps = HostCopy(timesteps)  # the n timesteps the UNet sees
        # Euler-type samplers carry x_t = x0 + sigma * noise (init_noise_sigma > 1);
        # DDIM, DPM++, UniPC and PNDM carry sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise
        self.sigma_space = float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0
        self.sigmas = None
        if getattr(scheduler, "sigmas", None) is not None and getattr(scheduler, "step_index", None) is not None:
            begin = scheduler.step_index - 1  # called after the first step
            self.sigmas = scheduler.sigmas[begin : begin + n + 1].float()
        else:
            self.alphas_cumprod = scheduler.alphas_cumprod
            self.final_alpha_cumprod = float(getattr(scheduler, "final_alpha_cumprod", 1.0))

    def shown(self, latents: torch.Tensor, k: int) -> torch.Tensor:
        """x_t at position k as every picture of it is decoded: in the variance-preserving
        form sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise, so early pictures of
        Euler's sigma-scaled latents are not saturated noise. Same shape and device."""
        if self.sigma_space:
            return latents / (self.sigmas[k] ** 2 + 1) ** 0.5
        return latents

    @functools.cached_property
    def levels(self) -> list[float]:
        """sqrt(1 - alpha_bar) of x_t at positions 0..n (1 = pure noise, 0 = clean)."""
        if self.sigmas is not None:
            sigmas = self.sigmas.double()
            return (sigmas / (sigmas**2 + 1).sqrt()).tolist()
        timesteps = self.timesteps.tensor().long().cpu()
        alpha_bars = [*self.alphas_cumprod[timesteps].tolist(), self.final_alpha_cumprod]
        return [max(1 - a, 0.0) ** 0.5 for a in alpha_bars]

    def sigma(self, k: int) -> float:
        """sigma = sqrt((1 - alpha_bar) / alpha_bar) of x_t at position k (inf for pure noise)."""
        level = self.levels[k]
        return float("inf") if level >= 1 else level / (1 - level**2) ** 0.5
