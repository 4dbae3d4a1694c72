"""Turning a step's latents into a picture, and the scheduler's x0 estimate.

Three decoders, cheapest first:
- `LatentRGB`: a Cx3 linear map (+ bias) straight from latent channels (4 or 16) to
  RGB at latent resolution; no weights, about free.
- `VAEDecoder` over an `AutoencoderTiny` (TAESD, TAESDXL, TAESD3, TAEF1 layouts),
  when one is configured.
- `VAEDecoder` over the checkpoint's own VAE; exact, as costly as the final decode.

Flux's packed latents are unpacked (`Family.unpack`) before any of them sees them.

Decoders run on the device that holds the latents and return uint8 pixels there;
`HostBuffers` brings them over, into memory allocated once per run, without stalling
the loop. Decoders only read
latents; they never touch the generator or the scheduler, so previews cannot
change the final image.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import layout
from .families import LatentFormat


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """First image of a batch in [-1, 1], (B, 3, H, W), as uint8 (H, W, 3) on the same device."""
    return ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


def picture_like(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """An empty uint8 (H, W, 3) CPU picture of the size `decode` makes of `latents` (1, C, h, w), without
    decoding them: the decoder's scale (8 for SD's VAE, 1 for latent->RGB) is found once, by decoding 2x2
    latents, and kept on the decoder. For the slots of pictures a run leaves for later (`HostBuffers.deferred`)
    when it decodes none as it goes."""
    scale = getattr(decode, "picture_scale", None)
    if scale is None:
        probe = decode(torch.zeros_like(latents[:, :, :2, :2]))
        scale = probe.shape[0] // 2
        if probe.shape[:2] != (2 * scale, 2 * scale):
            raise ValueError(f"the preview decoder made {tuple(probe.shape)} of 2x2 latents, not a whole scale")
        decode.picture_scale = scale
    return torch.empty((latents.shape[-2] * scale, latents.shape[-1] * scale, 3), dtype=torch.uint8)


class HostCopy:
    """A tensor in host memory, or on its way there. On CUDA it is a slice of the run's pinned
    `HostBuffers` that a non-blocking copy is landing in, queued behind the work that produces it,
    with the event recorded after that copy: reading it waits, on the thread that wants it. A
    `Deferred` copy is made on the first read."""

    def __init__(self, host: torch.Tensor, ready: torch.cuda.Event | Deferred | None = None):
        if host.device.type != "cpu":
            raise ValueError(f"HostCopy holds host tensors, got one on {host.device}; copy device tensors through "
                             "HostBuffers")
        self._host, self._ready = host.detach(), ready

    def tensor(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host

    def pil(self) -> Image.Image:
        return Image.fromarray(self.tensor().numpy())

    @property
    def made(self) -> bool:
        """False for a `Deferred` copy not read yet, whose first read makes it (a decode, on a CPU about
        a UNet step); True for any other, landed or landing."""
        return not isinstance(self._ready, Deferred) or self._ready.made

    @property
    def shape(self) -> torch.Size:
        """Known before the copy lands."""
        return self._host.shape

    @property
    def nbytes(self) -> int:
        """Host memory the copy holds (known before it lands): its own slice, not the run's whole buffer."""
        return self._host.numel() * self._host.element_size()


class Deferred:
    """A `HostCopy`'s `ready` whose tensor is made when it is first read, not when its frame was:
    `make()` runs once, on the first thread that reads (`synchronize`), and lands in the copy's
    slot. On a CPU a run's frames defer the pictures the page does not stream, and the streamed one
    of a step a newer step overtook, or of every step (the app's runs: `pipelines.generate`'s `live`);
    the same decoder on the same latents gives the same pixels whenever it runs. A `make` that
    raises raises to that reader, and the next read tries again."""

    def __init__(self, make: Callable[[], torch.Tensor], slot: torch.Tensor):
        self._make, self._slot, self._lock = make, slot, threading.Lock()

    @property
    def made(self) -> bool:
        return self._make is None

    def synchronize(self) -> None:
        with self._lock:
            if self._make is not None:
                self._slot.copy_(self._make())
                self._make = None  # let go of the latents and the decoder


class HostBuffers:
    """One run's host memory for what its frames keep, allocated once per kind rather than per step.

    Each kind of tensor a frame keeps (latents, x0, noise_pred, preview pixels, ...) gets one
    buffer with a row for every step of the run, allocated when the kind is first copied (its
    shape and dtype known), pinned on CUDA; each step's copy lands in its row. So a run makes one
    allocation per kind, however many steps it has (`allocations` counts them): a pinned
    allocation (`cudaHostAlloc`) is slow, takes the GIL, and was made four or five times a step
    before. The price: the rows of steps a stopped run never made stay allocated until its frames
    go. Copies run on the calling thread's current stream (the decode thread's side stream on
    CUDA), non-blocking into pinned memory, with one event per call after the last of them.
    Used by one thread at a time (the decode thread, or the step callback when decoding inline).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.allocations = 0
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Host memory allocated so far, in all kinds."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def copies(self, tensors: dict[str, torch.Tensor | None], row: int | None = None,
               rows: int = 1) -> dict[str, HostCopy | None]:
        """Copy each tensor (None stays None) into its kind's buffer: into row `row` of a buffer of
        `rows` rows, or, with `row` None, into a buffer of the tensor's own shape (a kind a run copies
        once: its start, its timesteps). Raises ValueError when a kind's shape or dtype differs from
        its buffer's (a run's steps all have the same)."""
        pinned = self.device.type == "cuda"
        ready = torch.cuda.Event() if pinned else None
        out = {}
        for kind, tensor in tensors.items():
            if tensor is None:
                out[kind] = None
                continue
            slot = self._slot(kind, tensor.shape, tensor.dtype, row, rows)
            slot.copy_(tensor.detach(), non_blocking=pinned)
            out[kind] = HostCopy(slot, ready)
        if ready is not None:
            ready.record()
        return out

    def deferred(self, kind: str, make: Callable[[], torch.Tensor], like: torch.Tensor, row: int | None = None,
                 rows: int = 1) -> HostCopy:
        """A copy of what `make()` returns (the shape and dtype of `like`) into its kind's buffer as
        `copies` makes one, made when it is first read (`Deferred`)."""
        slot = self._slot(kind, like.shape, like.dtype, row, rows)
        return HostCopy(slot, Deferred(make, slot))

    def _slot(self, kind: str, shape: torch.Size, dtype: torch.dtype, row: int | None, rows: int) -> torch.Tensor:
        buffer = self._buffers.get(kind)
        shape = shape if row is None else (rows, *shape)
        if buffer is None:
            buffer = self._buffers[kind] = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
            self.allocations += 1
        elif buffer.shape != shape or buffer.dtype != dtype:
            raise ValueError(f"{kind}: {tuple(shape)} {dtype} does not fit the run's buffer of "
                             f"{tuple(buffer.shape)} {buffer.dtype}")
        return buffer if row is None else buffer[row]


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

    def to_dict(self) -> dict:
        """As `from_dict` reads it."""
        return {"matrix": self.matrix.tolist(), "bias": self.bias.tolist()}

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


@dataclass
class SchedulerStep:
    """One `scheduler.step` call as it was given and returned its tensors: references, not copies
    (diffusers' schedulers and pipelines make new tensors each step and change none of these in
    place). `sigma_index`: the index into `sigmas` of the sigma the step used, for schedulers that
    keep a step index (None for DDIM and PNDM)."""

    model_output: torch.Tensor
    timestep: torch.Tensor
    sample: torch.Tensor
    pred_original_sample: torch.Tensor | None
    sigma_index: int | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.model_output, self.timestep, self.sample, self.pred_original_sample)
                if isinstance(t, torch.Tensor)]


class X0Recorder:
    """Keeps the latest step of one run's own scheduler (`latest`: the `noise_pred` it was given,
    the model output after guidance, and what it returned) and the latents the run started from;
    the clean-image estimate x0 of a step is worked out from those when asked (`x0_of`), so the
    denoising loop itself does nothing more.

    `callback_on_step_end` sees only x_t after a step, so this wraps `step` on the
    run's scheduler instance (never the class, never a shared one). x0 is the scheduler's
    `pred_original_sample` where it returns one (DDIM, Euler, Euler a) and otherwise is
    computed from the model output and the step's noise level (flow matching: x0 = x_t - sigma v).
    `start` is the `sample` of the first `step` call: the seed's noise for txt2img,
    the noised input image's latents for img2img and depth2img, in the scheduler's
    own space (sigma-scaled for Euler). It is only read, never changed.
    """

    def __init__(self, scheduler, flow_matching: bool = False):
        self.scheduler, self.flow_matching = scheduler, flow_matching
        self.latest: SchedulerStep | None = None
        self.start: torch.Tensor | None = None
        original = scheduler.step

        # wraps() keeps the signature: pipelines pass `generator` and `eta` only to a
        # `step` that declares them, and Euler a draws its noise from that generator.
        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if self.start is None:
                self.start = sample
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            index = getattr(scheduler, "step_index", None)  # `step` has just moved past the sigma it used
            self.latest = SchedulerStep(model_output, timestep, sample, getattr(out, "pred_original_sample", None),
                                        None if index is None else index - 1)
            return out if return_dict else (out.prev_sample,)

        scheduler.step = step

    @property
    def x0(self) -> torch.Tensor | None:
        """The latest step's x0."""
        return self.x0_of(self.latest) if self.latest is not None else None

    def x0_of(self, step: SchedulerStep) -> torch.Tensor:
        """A step's clean-image estimate x0, same shape, device and dtype as its sample (Euler's
        float32); computed on whichever thread asks, from the step's own tensors."""
        if step.pred_original_sample is not None:
            return step.pred_original_sample
        return self._x0_from_output(step.model_output, step.timestep, step.sample, step.sigma_index)

    def _x0_from_output(self, model_output, timestep, sample, sigma_index: int | None = None):
        s = self.scheduler
        if self.flow_matching:  # x_t = (1 - sigma) x0 + sigma noise and the model predicts v = noise - x0
            sigma = s.sigmas[sigma_index].to(sample.device, sample.dtype)
            return sample - sigma * model_output
        if hasattr(s, "_sigma_to_alpha_sigma_t"):  # DPM++ / UniPC
            alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(s.sigmas[sigma_index])
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
    Built from what the first step callback saw (`timesteps`, the run's n timesteps on their way
    to the host, and the scheduler's `step_index` then: None for schedulers without one) without a
    host sync; levels are read later.
    """

    def __init__(self, scheduler, timesteps: HostCopy, step_index: int | None, flow_matching: bool = False):
        n = timesteps.shape[0]
        self.flow_matching = flow_matching  # x_t = (1 - sigma) x0 + sigma noise: sigma is the share of noise
        # what `noise_pred` is: "epsilon", "v_prediction" or "sample"; "flow" (a velocity) for flow matching
        self.prediction_type = "flow" if flow_matching else scheduler.config.get("prediction_type", "epsilon")
        self.timesteps = timesteps  # the n timesteps the UNet sees
        # Euler-type samplers carry x_t = x0 + sigma * noise (init_noise_sigma > 1);
        # DDIM, DPM++, UniPC and PNDM carry sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise
        self.sigma_space = float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0
        self.sigmas = None
        if getattr(scheduler, "sigmas", None) is not None and step_index is not None:
            begin = step_index - 1  # seen after the first step
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


class SavedSchedule(NoiseSchedule):
    """A run's noise levels read back (a saved run, a frame from a worker process) instead of computed
    from a scheduler: its timesteps, the levels at positions 0..n, and what its noise_pred is."""

    def __init__(self, timesteps: list[float], levels: list[float], flow_matching: bool, prediction_type: str):
        self.flow_matching, self.sigma_space, self.sigmas = flow_matching, False, None
        self.prediction_type = prediction_type
        self.timesteps = HostCopy(torch.tensor(timesteps, dtype=torch.float64))
        self.__dict__["levels"] = list(levels)  # the cached_property's slot
