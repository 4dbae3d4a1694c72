"""One run: a validated request in, one frame per denoising step out."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from PIL import Image

from .cache import BUNDLED, ModelCache
from .previews import HostCopy, X0Recorder, to_pixels
from .request import GenerationRequest
from .schedulers import make_scheduler


class CancelToken:
    """Stop flag for one run. Each run has its own; nothing here is process-wide."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Cancelled(Exception):
    """Raised from the step callback to stop a pipeline that has no interrupt flag."""


class GenerationError(RuntimeError):
    """A run failed in a way the user can act on; the message says how."""


@dataclass
class Frame:
    step: int  # 1-based
    total: int
    t: HostCopy  # the timestep, copied without a host sync
    view: str  # "x_t" or "x0"
    seconds: float  # since the run started
    pixels: HostCopy  # uint8 (H, W, 3)
    depth_pixels: HostCopy | None = None  # depth2img: the depth map the UNet sees (first frame only)
    latents: HostCopy | None = None  # x_t as the pipeline holds it, for the timeline
    x0: HostCopy | None = None  # the step's clean-image estimate
    alphas_cumprod: torch.Tensor | None = None  # the run's noise schedule (CPU), shared by its frames
    schedule_t: HostCopy | None = None  # first frame: every timestep of the run

    @cached_property
    def noise_level(self) -> float:
        """sqrt(1 - alpha_bar_t): the share of noise in x_t (1 = pure noise)."""
        return _noise_level(self.alphas_cumprod, self.timestep)

    def schedule_levels(self) -> list[float]:
        """The noise level at every step of the run (first frame only)."""
        return [_noise_level(self.alphas_cumprod, float(t)) for t in self.schedule_t.tensor()]

    @property
    def sigma(self) -> float:
        """sigma_t = sqrt((1 - alpha_bar) / alpha_bar), the noise scale Euler-type samplers use."""
        level = self.noise_level
        return float("inf") if level >= 1 else level / (1 - level**2) ** 0.5

    @cached_property
    def timestep(self) -> float:
        return float(self.t.tensor())

    @cached_property
    def image(self) -> Image.Image:
        return self.pixels.pil()

    @cached_property
    def depth(self) -> Image.Image | None:
        return self.depth_pixels.pil() if self.depth_pixels is not None else None

    @property
    def caption(self) -> str:
        return f"step {self.step}/{self.total} · t={self.timestep:.0f}"


@dataclass
class Final:
    image: Image.Image
    request: GenerationRequest
    model: str
    seconds: float
    notes: tuple[str, ...] = ()  # what was coerced or cut on the way in


_PIPELINE_CALL = {
    # mode -> request fields the diffusers call takes besides the common ones
    "txt2img": ("width", "height"),
    "img2img": ("image", "strength"),
    "depth2img": ("image", "strength"),
}


def generate(
    request: GenerationRequest,
    cache: ModelCache,
    cancel: CancelToken | None = None,
    source: str = BUNDLED,
) -> Iterator[Frame | Final]:
    """Yield a `Frame` after every denoising step, then one `Final`.

    The diffusers call runs in a worker thread; its step callback hands the
    step's latents to the preview decoder, whose frames come back over a queue
    (a callback cannot yield). Each frame also keeps x_t and x0 for the
    timeline. Closing this iterator early (a client went away) cancels the run.
    """
    cancel = cancel or CancelToken()
    # 1. The shared pipeline, and a per-run one with its own scheduler and interrupt flag
    shared = cache.pipeline(request.mode, source)
    checkpoint = cache.checkpoint(source)
    scheduler = make_scheduler(request.scheduler, shared.scheduler.config)
    pipe = _per_run(shared, scheduler)
    recorder = X0Recorder(scheduler)  # x0 for every frame: the timeline shows both views
    notes = request.notes + _truncation_notes(pipe.tokenizer, request)

    # 2. The preview decoder
    decode = checkpoint.decoder(request.preview)

    # 3. Step callback: hand the step's latents to the decoder, which turns them
    #    into a Frame (on its own thread, overlapping the next UNet step, where the
    #    cache says so)
    frames: queue.Queue = queue.Queue()
    started = time.perf_counter()
    interruptible = hasattr(pipe, "_interrupt")

    def on_step_end(p, i, t, tensors):
        if cancel.cancelled:
            if not interruptible:  # depth2img: no interrupt flag
                raise Cancelled
            p._interrupt = True
            return tensors
        latents = recorder.x0 if request.view == "x0" else _display_latents(scheduler, tensors["latents"])
        depth = HostCopy(_depth_pixels(tensors["depth_mask"])) if i == 0 and "depth_mask" in tensors else None
        fields = dict(step=i + 1, total=p._num_timesteps, t=HostCopy(torch.as_tensor(t)), view=request.view,
                      seconds=time.perf_counter() - started, depth_pixels=depth,
                      latents=HostCopy(tensors["latents"]), x0=HostCopy(recorder.x0),
                      alphas_cumprod=scheduler.alphas_cumprod,
                      schedule_t=HostCopy(scheduler.timesteps[-p._num_timesteps:]) if i == 0 else None)
        decoder.submit(latents, lambda pixels: Frame(pixels=pixels, **fields))
        return tensors

    # 4. The diffusers call, as the bare pipeline would be called
    call = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents", "depth_mask"] if request.mode == "depth2img" else ["latents"],
        **{name: getattr(request, name) for name in _PIPELINE_CALL[request.mode]},
    )
    if request.depth_map is not None:
        call["depth_map"] = torch.from_numpy(request.depth_map)[None]

    def work():
        # what ends the run goes through the decode thread, behind the last frames
        try:
            with cache.run_lock:
                decoder.finish(pipe(**call).images[0])
        except Cancelled:
            decoder.finish(None)
        except torch.OutOfMemoryError:
            cache.free_memory()
            decoder.finish(GenerationError(
                f"the {cache.device.type} ran out of memory at {request.width}x{request.height}; "
                "lower width and height (or close other GPU programs) and try again"))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            decoder.finish(err)

    # 5. Run, relay frames, finish with the final image
    decoder = _Decoder(decode, frames, cache.device, threaded=cache.overlap_decode)
    worker = threading.Thread(target=work, name="stepwise-run", daemon=True)
    worker.start()
    try:
        while True:
            item = frames.get()
            if isinstance(item, Frame):
                yield item
                continue
            if isinstance(item, BaseException):
                raise item
            if item is not None and not cancel.cancelled:
                yield Final(item, request, source, time.perf_counter() - started, notes)
            return  # cancelled: the frames so far are what the run made
    finally:
        cancel.cancel()  # no-op after a finished run; stops one whose consumer left
        worker.join()


class _Decoder:
    """Turns queued step latents into Frames, in the order steps arrive.

    Threaded (the default): the step callback only queues latents and a
    thread decodes them, on CUDA on a side stream that first waits for the
    step's latents, so decoding overlaps the next UNet step and the loop never
    syncs with the host. Inline: the callback decodes before the loop goes on.
    """

    def __init__(self, decode, out: queue.Queue, device: torch.device, threaded: bool):
        self._decode, self._out = decode, out
        self._in: queue.Queue | None = queue.Queue() if threaded else None
        self._stream = torch.cuda.Stream(device) if threaded and device.type == "cuda" else None
        if threaded:
            threading.Thread(target=self._run, name="stepwise-decode", daemon=True).start()

    def submit(self, latents: torch.Tensor, make_frame) -> None:
        if self._in is None:
            self._out.put(make_frame(HostCopy(self._decode(latents))))
            return
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record()
            latents.record_stream(self._stream)  # keep the allocator off it until the side stream is done
        self._in.put((latents, ready, make_frame))

    def finish(self, item) -> None:
        """Pass the run's end (final image, None when cancelled, or an error) on after the frames."""
        if self._in is None:
            self._out.put(item)
        else:
            self._in.put((None, None, item))

    def _run(self) -> None:
        while True:
            latents, ready, item = self._in.get()
            if latents is None:
                self._out.put(item)
                return
            try:
                with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                    if ready is not None:
                        self._stream.wait_event(ready)
                    self._out.put(item(HostCopy(self._decode(latents))))
            except Exception as err:  # noqa: BLE001 - surfaces in the caller's thread
                self._out.put(err)
                return


def _noise_level(alphas_cumprod: torch.Tensor, timestep: float) -> float:
    alpha_bar = float(alphas_cumprod[min(int(round(timestep)), len(alphas_cumprod) - 1)])
    return (1 - alpha_bar) ** 0.5


def _truncation_notes(tokenizer, request: GenerationRequest) -> tuple[str, ...]:
    """CLIP reads model_max_length tokens (77 for SD); say what was cut, as diffusers only logs it."""
    notes = []
    for field in ("prompt", "negative_prompt"):
        ids = tokenizer(getattr(request, field), truncation=False).input_ids
        limit = tokenizer.model_max_length
        if len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
            notes.append(f"{field}: {len(ids)} tokens, the model reads {limit}; cut off: “{cut}”")
    return tuple(notes)


def _per_run(shared, scheduler):
    """A pipeline object of our own over the shared modules: its own scheduler and
    interrupt flag, no copies of weights (constructing one takes milliseconds)."""
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in shared.config else {}
    pipe = type(shared)(**{**shared.components, "scheduler": scheduler}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _display_latents(scheduler, latents: torch.Tensor) -> torch.Tensor:
    # Sigma-space schedulers (Euler, ...) carry x_t = x0 + sigma * noise; scale to the
    # variance-preserving form so early previews are not saturated noise.
    if getattr(scheduler, "init_noise_sigma", 1.0) > 1.0 and scheduler.step_index is not None:
        sigma = scheduler.sigmas[min(scheduler.step_index, len(scheduler.sigmas) - 1)]
        return latents / (sigma**2 + 1) ** 0.5
    return latents


def _depth_pixels(depth_mask: torch.Tensor) -> torch.Tensor:
    # depth_mask is already min-max scaled to [-1, 1] by the pipeline, one row per CFG half
    return to_pixels(depth_mask[:1].expand(-1, 3, -1, -1))

