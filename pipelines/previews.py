"""Turning a step's latents into a picture, and the scheduler's x0 estimate.

Three decoders, cheapest first:
- `LatentRGB`: a Cx3 linear map (+ bias) straight from latent channels (4 or 16) to
  RGB at latent resolution; no weights, about free.
- `VAEDecoder` over an `AutoencoderTiny` (TAESD, TAESDXL, TAESD3, TAEF1 layouts),
  when one is configured.
- `VAEDecoder` over the checkpoint's own VAE; exact, as costly as the final decode.

Flux's packed latents are unpacked (`Family.unpack`) before any of them sees them.

Decoders run on the device that holds the latents and return uint8 pixels there;
`HostCopy` brings them over without stalling the loop. Decoders only read
latents; they never touch the generator or the scheduler, so previews cannot
change the final image.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import layout
from .families import LatentFormat


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

    @torch.no_grad()
    def signed(self, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A signed latent-space tensor (noise_pred, a difference of latents), (1, C, h, w), as a
        picture: the map without its bias (which belongs to latents, not to their differences),
        divided by its own max |value| so 0 is mid-grey. Returns uint8 (h, w, 3) on the tensor's
        device and that max, in the map's RGB units (0 for an all-zero tensor: all grey)."""
        rgb = torch.einsum("bchw,cr->brhw", latents.float(), self.matrix.float().to(latents.device))
        scale = float(rgb.abs().max())
        return to_pixels(rgb / scale if scale > 0 else rgb), scale

    @classmethod
    def published(cls, latents: LatentFormat) -> LatentRGB:
        return cls(torch.tensor(latents.rgb), torch.tensor(latents.rgb_bias))

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
        generator = torch.Generator().manual_seed(seed)
        channels = vae.config.latent_channels
        latents = torch.randn(samples, channels, size, size, generator=generator) * vae.config.scaling_factor
        decoded = VAEDecoder(vae).decode(latents).float().cpu()
        decoded = torch.nn.functional.adaptive_avg_pool2d(decoded, size)
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = decoded.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(x, y).solution
        return cls(solution[:channels], solution[channels])


# matplotlib's "inferno" colour map at 0, 1/4, 1/2, 3/4 and 1 (its _cm_listed.py table x 255, rounded),
# linear between: dark to bright, and still ordered in grey
INFERNO = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


@torch.no_grad()
def heat_overlay(pixels: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Each map of `heat` (T, h, w), >= 0, over the picture `pixels` (H, W, 3) uint8 turned grey
    (ITU-R BT.601 luma, so every colour in the result is the heat's): each map scaled to [0, 1] from
    its own min to its max, upsampled bilinear to (H, W), coloured with INFERNO and blended with
    weight `alpha`. Returns uint8 (T, H, W, 3) on the CPU."""
    heat = heat.float().cpu()
    low, high = heat.amin((1, 2), keepdim=True), heat.amax((1, 2), keepdim=True)
    heat = ((heat - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)
    heat = torch.nn.functional.interpolate(heat[:, None], size=tuple(pixels.shape[:2]), mode="bilinear",
                                           align_corners=False)[:, 0]
    position = heat * (len(INFERNO) - 1)  # bilinear stays within [0, 1]
    low = position.floor().long().clamp(max=len(INFERNO) - 2)
    colours = torch.tensor(INFERNO, dtype=torch.float32)
    colour = torch.lerp(colours[low], colours[low + 1], (position - low)[..., None])
    grey = (pixels.cpu().float() @ torch.tensor([0.299, 0.587, 0.114]))[..., None]
    return (alpha * colour + (1 - alpha) * grey).round().to(torch.uint8)


def latent_rgb_for(folder: Path | None, vae, latents: LatentFormat) -> LatentRGB:
    """The map for this checkpoint: its own file, the family's published map when the VAE is
    the family's real one, or a fit against the VAE."""
    data = layout.read_latent_rgb(folder) if folder is not None else None
    if data is not None:
        return LatentRGB.from_dict(data)
    if latents.is_published_vae(vae.config):
        return LatentRGB.published(latents)
    return LatentRGB.fit(vae)


class VAEDecoder:
    """Full VAE (`AutoencoderKL`) or tiny one (`AutoencoderTiny`): decode like the pipeline does,
    `latents / scaling_factor + shift_factor`. A VAE whose config says `force_upcast` (SDXL's
    overflows in fp16: black previews) decodes with a float32 copy, made once, as diffusers'
    SDXL pipeline upcasts for its final decode."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        if vae.config.get("force_upcast") and vae.dtype == torch.float16:
            self.vae = copy.deepcopy(vae).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) sampler latents -> (B, 3, H, W) images in about [-1, 1], in the VAE's dtype."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + (config.get("shift_factor") or 0.0)
        return self.vae.decode(latents, return_dict=False)[0]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return to_pixels(self.decode(latents))


class X0Recorder:
    """Keeps the latest clean-image estimate x0 of one run's own scheduler, the
    `noise_pred` it was given (the model output after guidance), and the latents the
    run started from.

    `callback_on_step_end` sees only x_t after a step, so this wraps `step` on the
    run's scheduler instance (never the class, never a shared one). It takes the
    scheduler's `pred_original_sample` where it returns one (DDIM, Euler, Euler a)
    and otherwise computes x0 from the model output and the step's noise level (flow
    matching: x0 = x_t - sigma v).
    `start` is the `sample` of the first `step` call: the seed's noise for txt2img,
    the noised input image's latents for img2img and depth2img, in the scheduler's
    own space (sigma-scaled for Euler). It is only read, never changed.
    """

    def __init__(self, scheduler, flow_matching: bool = False):
        self.scheduler, self.flow_matching = scheduler, flow_matching
        self.x0: torch.Tensor | None = None
        self.noise_pred: torch.Tensor | None = None
        self.start: torch.Tensor | None = None
        original = scheduler.step

        # wraps() keeps the signature: pipelines pass `generator` and `eta` only to a
        # `step` that declares them, and Euler a draws its noise from that generator.
        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if self.start is None:
                self.start = sample
            self.noise_pred = model_output
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            self.x0 = x0 if x0 is not None else self._x0_from_output(model_output, timestep, sample)
            return out if return_dict else (out.prev_sample,)

        scheduler.step = step

    def _x0_from_output(self, model_output, timestep, sample):
        s = self.scheduler
        if self.flow_matching:  # x_t = (1 - sigma) x0 + sigma noise and the model predicts v = noise - x0
            sigma = s.sigmas[s.step_index - 1].to(sample.device, sample.dtype)
            return sample - sigma * model_output
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

    def __init__(self, scheduler, timesteps: torch.Tensor, flow_matching: bool = False):
        n = len(timesteps)
        self.flow_matching = flow_matching  # x_t = (1 - sigma) x0 + sigma noise: sigma is the share of noise
        # what `noise_pred` is: "epsilon", "v_prediction" or "sample"; "flow" (a velocity) for flow matching
        self.prediction_type = "flow" if flow_matching else scheduler.config.get("prediction_type", "epsilon")
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
        """The share of noise in x_t at positions 0..n (1 = pure noise, 0 = clean): sqrt(1 - alpha_bar),
        or sigma for flow matching."""
        if self.flow_matching:
            return self.sigmas.double().tolist()
        if self.sigmas is not None:
            sigmas = self.sigmas.double()
            return (sigmas / (sigmas**2 + 1).sqrt()).tolist()
        timesteps = self.timesteps.tensor().long().cpu()
        alpha_bars = [*self.alphas_cumprod[timesteps].tolist(), self.final_alpha_cumprod]
        return [max(1 - a, 0.0) ** 0.5 for a in alpha_bars]

    def sigma(self, k: int) -> float:
        """The noise scale of x_t at position k in the model's own terms: flow matching's sigma, else
        sqrt((1 - alpha_bar) / alpha_bar) (inf for pure noise)."""
        level = self.levels[k]
        if self.flow_matching:
            return level
        return float("inf") if level >= 1 else level / (1 - level**2) ** 0.5
