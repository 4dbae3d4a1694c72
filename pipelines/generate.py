"""One run: a validated request in, one frame per denoising step out."""

from __future__ import annotations

import contextlib
import inspect
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from PIL import Image

from .cache import BUNDLED, ModelCache
from .capture import AttentionRecorder, GuidancePair, denoiser, prompt_tokens
from .depth import control_image
from .families import Family
from .previews import (
    HostBuffers,
    HostCopy,
    LatentRGB,
    NoiseSchedule,
    SchedulerStep,
    X0Recorder,
    heat_overlay,
    picture_like,
    to_pixels,
)
from .protocol import CancelToken, Final, GenerationError
from .request import GenerationRequest
from .schedulers import make_scheduler


PICTURE = {"x_t": "xt_pixels", "x0": "x0_pixels", "start": "start_pixels"}  # each view's Frame field
LATENTS = {"x_t": "latents", "x0": "x0", "start": "start_latents"}  # and the field of what it is decoded from


class Cancelled(Exception):
    """Raised from the step callback to stop a pipeline that has no interrupt flag."""


@dataclass
class Frame:
    """One denoising step as the run showed it.

    Both views are pictures made by the run's own preview decoder, from
    `NoiseSchedule.shown` x_t and the scheduler's x0; the timeline shows these very
    pixels and never decodes again (so it cannot drift from what streamed). On a CPU
    the view not streamed, the first frame's start, and the streamed view of a step not
    made live (`generate`'s `live`), are made when first read, or by the run once its
    consumer is done with it (`previews.Deferred`): the same decoder on the same
    latents, so the same pixels.
    """

    step: int  # 1-based
    total: int  # UNet evaluations in the run: steps x strength for img2img and depth2img, one more for PNDM
    t: HostCopy  # the timestep the UNet evaluated at this step, copied without a host sync
    view: str  # the view streamed live: "x_t" or "x0"
    seconds: float  # since the run started
    xt_pixels: HostCopy  # uint8 (H, W, 3): x_t after this step
    x0_pixels: HostCopy  # uint8 (H, W, 3): this step's clean-image estimate x0
    latents: HostCopy  # (1, C, h, w): the x_t that `xt_pixels` was decoded from, for the channel views
    schedule: NoiseSchedule  # the run's noise levels, shared by its frames
    depth_pixels: HostCopy | None = None  # depth2img: the depth the denoiser sees (first frame only)
    start_pixels: HostCopy | None = None  # first frame: the latents the run started from, as x_t is shown
    start_latents: HostCopy | None = None  # first frame: those latents, as decoded into `start_pixels`
    # inside the denoiser, in latent space (1, C, h, w) like `latents` (Flux's unpacked), the model's dtype:
    x0: HostCopy | None = None  # this step's clean-image estimate, as decoded into `x0_pixels`
    noise_pred: HostCopy | None = None  # what the scheduler received: epsilon, v (v-prediction) or flow velocity
    noise_pred_text: HostCopy | None = None  # under classifier-free guidance: the prompt's prediction,
    noise_pred_uncond: HostCopy | None = None  # the negative prompt's (or empty prompt's) prediction
    attention: HostCopy | None = None  # with record_attention: (T, h, w) float16, one map per prompt token
    tokens: tuple[str, ...] = ()  # the prompt tokens `attention` maps, in order (shared by the run's frames)
    latent_rgb: LatentRGB | None = None  # the run's latent->RGB map (shared): pictures of latent-space tensors

    @property
    def pixels(self) -> HostCopy:
        """The view streamed live."""
        return self.x0_pixels if self.view == "x0" else self.xt_pixels

    @property
    def decoded(self) -> tuple[HostCopy, ...]:
        """Every picture decoded from the run's latents: both views, and the start on the first frame (on a
        CPU some are `Deferred`: made when first read)."""
        return tuple(copy for copy in (self.xt_pixels, self.x0_pixels, self.start_pixels) if copy is not None)

    @property
    def schedule_t(self) -> HostCopy | None:
        """First frame only: every timestep of the run."""
        return self.schedule.timesteps if self.step == 1 else None

    def schedule_levels(self) -> list[float]:
        """Noise level sqrt(1 - alpha_bar) of x_t at the start (index 0) and after each step."""
        return self.schedule.levels

    @property
    def noise_level(self) -> float:
        """sqrt(1 - alpha_bar) of x_t after this step: the share of noise in it (1 = pure noise)."""
        return self.schedule.levels[self.step]

    @property
    def sigma(self) -> float:
        """sigma = sqrt((1 - alpha_bar) / alpha_bar) of x_t after this step, the noise scale Euler-type samplers use."""
        return self.schedule.sigma(self.step)

    @property
    def nbytes(self) -> int:
        """Host memory of the pictures and latents this frame keeps, its cached PIL images included
        (Pillow stores an RGB pixel in 4 bytes)."""
        kept = (self.t, self.xt_pixels, self.x0_pixels, self.latents, self.depth_pixels, self.start_pixels,
                self.start_latents, self.x0, self.noise_pred, self.noise_pred_text, self.noise_pred_uncond,
                self.attention)
        cached = [self.__dict__[name] for name in ("image", "depth") if self.__dict__.get(name) is not None]
        return sum(copy.nbytes for copy in kept if copy is not None) + sum(4 * im.width * im.height for im in cached)

    def picture(self, latents: torch.Tensor) -> tuple[Image.Image, float]:
        """A signed latent-space tensor (1, C, h, w) (noise_pred, `guidance`, `removed`) as a latent-sized
        picture through the run's latent->RGB map, 0 at mid-grey, and the max |value| it is divided by
        (`LatentRGB.signed`)."""
        pixels, scale = self.latent_rgb.signed(latents)
        return Image.fromarray(pixels.cpu().numpy()), scale

    def removed(self, before: HostCopy) -> torch.Tensor:
        """What this step took from x_t: `before` (the x_t it denoised: the previous frame's `latents`, or
        the first frame's `start_latents`) minus `latents`, both in the same variance-preserving form;
        (1, C, h, w) float32."""
        return before.tensor().float() - self.latents.tensor().float()

    @property
    def guidance(self) -> torch.Tensor | None:
        """The guidance direction noise_pred_text - noise_pred_uncond, (1, C, h, w) float32; None
        without classifier-free guidance."""
        if self.noise_pred_text is None:
            return None
        return self.noise_pred_text.tensor().float() - self.noise_pred_uncond.tensor().float()

    @cached_property
    def noise_pred_rms(self) -> float:
        """Root mean square of `noise_pred` over its elements."""
        return float(self.noise_pred.tensor().float().square().mean().sqrt())

    @cached_property
    def guidance_rms(self) -> float | None:
        """Root mean square of `guidance` over its elements; None without guidance."""
        guidance = self.guidance
        return None if guidance is None else float(guidance.square().mean().sqrt())

    def attention_overlays(self) -> list[tuple[Image.Image, float, float]]:
        """Each prompt token's attention map over this step's x0 picture (`heat_overlay`: scaled from its
        own min to its max, upsampled bilinear to the picture's size, inferno colours), with that min and
        max: the token's smallest and largest share of a latent pixel's attention. Needs `attention`."""
        heat = self.attention.tensor().float()
        images = heat_overlay(self.x0_pixels.tensor(), heat).numpy()
        return [(Image.fromarray(image), float(m.min()), float(m.max())) for image, m in zip(images, heat)]

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


def pipeline_inputs(pipe, request: GenerationRequest, control: torch.Tensor | None = None) -> dict:
    """The request fields this pipeline's call takes besides prompt, steps, guidance and generator:
    size (img2img takes it from the image, and SD3's and Flux's need it said), the input image and
    strength (a depth ControlNet pipeline without them starts from noise), the negative prompt where
    the model has one, the uploaded depth map (SD 2-depth) or `control` (a ControlNet or Flux depth
    run's (1, 3, H, W) depth picture, `control_image`). Shared with the tests' bare calls."""
    takes = inspect.signature(pipe.__call__).parameters
    names = ["width", "height"] if request.mode == "txt2img" or "width" in takes else []
    if request.mode != "txt2img":
        names += [name for name in ("image", "strength") if name in takes]
    inputs = {name: getattr(request, name) for name in names}
    if request.negative_prompt:
        inputs["negative_prompt"] = request.negative_prompt
    if request.depth_map is not None and "depth_map" in takes:
        inputs["depth_map"] = torch.from_numpy(request.depth_map)[None]
    if control is not None:
        inputs["control_image"] = control
    return inputs


def depth_control(pipe, request: GenerationRequest, cache: ModelCache, source: str) -> torch.Tensor | None:
    """The depth picture a depth run's pipeline takes as `control_image`, (1, 3, H, W) float32 in [0, 1]:
    from the uploaded depth map, else estimated from the input image (`ModelCache.estimator`). None for
    other modes and for SD 2-depth, which takes the map itself. Raises ModelLoadError when it must
    estimate and has no estimator."""
    if request.mode != "depth2img" or "control_image" not in inspect.signature(pipe.__call__).parameters:
        return None
    if request.depth_map is not None:
        depth = torch.from_numpy(request.depth_map)
    else:
        depth = cache.estimator(source)(request.image)
    return control_image(depth, request.width, request.height)


def generate(
    request: GenerationRequest,
    cache: ModelCache,
    cancel: CancelToken | None = None,
    source: str = BUNDLED,
    make_deferred: bool = True,
    live: bool = True,
) -> Iterator[Frame | Final]:
    """Yield a `Frame` after every denoising step, then one `Final`.

    The diffusers call runs in a worker thread; its step callback hands
    references to the step's tensors to the decoder, whose frames come back over
    a queue (a callback cannot yield). Each frame keeps both views as pictures (and the
    first frame the run's starting latents), so the timeline shows what the run
    made without loading a model; on a CPU the view not streamed is made after the
    final image (`Frame`), on a thread of its own once the consumer is done, unless
    `make_deferred` is False (a consumer that reads no picture but those made live, as
    the child process: `pipelines.child`; its frames then have None for the rest); so is
    the streamed view of a step that a newer one overtook, and with `live` False of
    every step (the app: each page update decodes the picture it shows,
    `ui.stream.RunView.write_newest`).
    Closing this iterator early (a client went away) cancels the run. The run holds
    its checkpoint in `cache` (never evicted) until it ends.
    """
    with cache.running(source):
        yield from _run(request, cache, cancel or CancelToken(), source, make_deferred, live)


def _run(request: GenerationRequest, cache: ModelCache, cancel: CancelToken, source: str,
         make_deferred: bool, live: bool) -> Iterator[Frame | Final]:
    # 1. The shared pipeline, and a per-run one with its own scheduler and interrupt flag
    shared = cache.pipeline(request.mode, source)
    checkpoint = cache.checkpoint(source)
    family = checkpoint.family
    scheduler = make_scheduler(request.scheduler, shared.scheduler.config, family.flow_matching)
    pipe = _per_run(shared, scheduler)
    # x0, the noise prediction and the starting latents: the timeline shows them all, and step 0
    recorder = X0Recorder(scheduler, family.flow_matching)
    # inside the denoiser: the guidance pair always, cross-attention per token when asked
    pair = GuidancePair()
    # transformers' fast tokenizers set padding and truncation on their one shared backend at every call,
    # so another run's encode_prompt beside these reads could lose its padding: they too hold run_lock
    with cache.run_lock:
        notes = request.notes + _truncation_notes(pipe, family, request) + _unused_notes(pipe, request)
        positions, tokens = prompt_tokens(pipe, family, request.prompt) if request.record_attention else ([], ())
    attention = AttentionRecorder(positions, _latent_grid(pipe, request)) if positions else None
    if request.record_attention and not positions:
        notes += ("record_attention: the prompt has no tokens, so there are no maps to record",)
    control = depth_control(pipe, request, cache, source)

    # 2. The preview decoder, and the view the page streams
    decode = checkpoint.decoder(request.preview)
    streamed = "x0" if request.view == "x0" else "x_t"
    defer = cache.device.type == "cpu"

    # 3. Step callback: on the denoising thread, between UNet calls, it only hands references to
    #    the step's tensors to the decoder, which makes the Frame (x0, pictures, host copies into
    #    memory allocated once for the run) on its own thread, overlapping the next UNet step,
    #    where the cache says so
    frames: queue.Queue = queue.Queue()
    started = time.perf_counter()
    interruptible = hasattr(pipe, "_interrupt")
    host = HostBuffers(cache.device)

    def on_step_end(p, i, t, tensors):
        if cancel.cancelled:
            if not interruptible:  # depth2img: no interrupt flag
                raise Cancelled
            p._interrupt = True
            return tensors
        first = i == 0
        decoder.submit(_Step(
            index=i, total=p._num_timesteps, t=t, seconds=time.perf_counter() - started, latents=tensors["latents"],
            scheduler_step=recorder.latest, noise_pred_text=pair.noise_pred_text,
            noise_pred_uncond=pair.noise_pred_uncond, attention=attention.take_sum() if attention is not None else None,
            start=recorder.start if first else None, depth_mask=tensors.get("depth_mask") if first else None,
            timesteps=scheduler.timesteps if first else None,
            step_index=getattr(scheduler, "step_index", None) if first else None))
        return tensors

    schedule: NoiseSchedule | None = None  # made with the first frame, from what the first callback saw

    like: torch.Tensor | None = None  # the shape and dtype of every deferred picture of the run

    def make_frame(step: _Step, live: bool) -> Frame:
        """The step's pictures and host copies, on the decode thread (on CUDA its side stream); `live`:
        make the streamed view now (`_Decoder._live`)."""
        nonlocal schedule, like
        i, first = step.index, step.index == 0
        if first:
            timesteps = host.copies({"timesteps": step.timesteps[-step.total:]})["timesteps"]
            schedule = NoiseSchedule(scheduler, timesteps, step.step_index, family.flow_matching)
        # what every picture of this step is made from, as (1, C, h, w); the frame keeps the pictures
        views = {"x_t": schedule.shown(unpack(step.latents), i + 1), "x0": unpack(recorder.x0_of(step.scheduler_step))}
        if first:
            views["start"] = schedule.shown(unpack(step.start), 0)
        # on a CPU, where a decode costs about a UNet step, at most the streamed view of the newest step is
        # decoded now, the rest when first read or once the run is over (`Deferred`), so neither the UNet
        # nor the final image waits for previews; on CUDA all now, on the side stream
        now = views.keys() if not defer else [streamed] if live else []
        pictures = {name: decode(views[name]) for name in now}
        later = [name for name in views if name not in pictures]
        if later and make_deferred and like is None:
            like = pictures[streamed] if streamed in pictures else picture_like(decode, views[streamed])
        maps = step.attention[0] / step.attention[1] if step.attention is not None else None
        kept = host.copies(dict(
            t=torch.as_tensor(step.t), latents=views["x_t"], x0=views["x0"],
            noise_pred=unpack(step.scheduler_step.model_output),
            noise_pred_text=unpack(step.noise_pred_text), noise_pred_uncond=unpack(step.noise_pred_uncond),
            attention=maps.half() if maps is not None else None,
            **{PICTURE[name]: pictures[name] for name in now if name != "start"}), row=i, rows=step.total)
        if first:
            depth = None
            if step.depth_mask is not None:
                depth = _depth_pixels(step.depth_mask)
            elif control is not None:  # the picture the ControlNet (or Flux's VAE) is given
                depth = to_pixels(control * 2 - 1)
            kept |= host.copies({"start_latents": views["start"], "start_pixels": pictures.get("start"),
                                 "depth_pixels": depth})
        for name in later:  # from the host copies of its latents; None for a consumer that reads none of them
            if not make_deferred:
                kept[PICTURE[name]] = None
                continue
            rows = dict(row=i, rows=step.total) if name != "start" else {}  # the start is once a run
            latents = kept[LATENTS[name]]
            kept[PICTURE[name]] = host.deferred(PICTURE[name], lambda latents=latents: decode(latents.tensor()),
                                                like=like, **rows)
        return Frame(step=i + 1, total=step.total, view=request.view, seconds=step.seconds, schedule=schedule,
                     tokens=tokens, latent_rgb=checkpoint.latent_rgb, **kept)

    def unpack(latents: torch.Tensor | None) -> torch.Tensor | None:
        return None if latents is None else family.unpack(latents, pipe, request.width, request.height)

    # 4. The diffusers call, as the bare pipeline would be called
    call = dict(
        prompt=request.prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=[name for name in ("latents", "depth_mask")
                                            if name in pipe._callback_tensor_inputs],
        **pipeline_inputs(pipe, request, control),
    )

    global_rng = request.mode == "depth2img" and family.depth.global_rng

    def work():
        # what ends the run goes through the decode thread, behind the last frames
        try:
            with (cache.run_lock, _global_rng(request.seed if global_rng else None), pair.hooked(denoiser(pipe)),
                  attention.hooked(denoiser(pipe)) if attention is not None else contextlib.nullcontext()):
                if cancel.cancelled:  # stopped while it waited for the device: nothing to make
                    raise Cancelled
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
    decoder = _Decoder(make_frame, frames, cache.device, threaded=cache.overlap_decode, live=live)
    worker = threading.Thread(target=work, name="stepwise-run", daemon=True)
    worker.start()
    shown: list[Frame] = []
    try:
        while True:
            item = frames.get()
            if isinstance(item, Frame):
                shown.append(item)
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
        if defer and shown and make_deferred:  # the pictures of its frames no one has read yet, made now that
            # the consumer is done; not a daemon (one torn down mid-decode at exit aborts the process), but it
            # stops at exit
            threading.Thread(target=_make_all, args=(shown,), name="stepwise-deferred").start()


@dataclass
class _Step:
    """What the step callback hands over: references to one step's tensors, not copies (diffusers
    makes new latents, noise predictions and scheduler outputs every step and changes none of them
    in place; a CUDA-graph compile mode, which reuses output memory, would break this)."""

    index: int  # 0-based
    total: int  # the run's UNet evaluations (`Frame.total`)
    t: torch.Tensor  # the timestep, as the loop passed it
    seconds: float  # since the run started
    latents: torch.Tensor  # x_t after the step, as the scheduler keeps it (packed for Flux)
    scheduler_step: SchedulerStep  # noise_pred and what `scheduler.step` returned: x0 comes from it
    noise_pred_text: torch.Tensor | None  # the guidance pair (`GuidancePair`), or None
    noise_pred_uncond: torch.Tensor | None
    attention: tuple[torch.Tensor, int] | None  # with record_attention: `AttentionRecorder.take_sum()`
    start: torch.Tensor | None = None  # first step: the latents the run started from
    depth_mask: torch.Tensor | None = None  # first step, SD 2-depth: the depth the UNet sees
    timesteps: torch.Tensor | None = None  # first step: the scheduler's timesteps
    step_index: int | None = None  # first step: the scheduler's step index then (`NoiseSchedule`)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it refers to."""
        refs = [self.t, self.latents, self.noise_pred_text, self.noise_pred_uncond, self.start, self.depth_mask,
                self.timesteps, self.attention[0] if self.attention is not None else None]
        return [t for t in refs if isinstance(t, torch.Tensor)] + self.scheduler_step.tensors()


class _Decoder:
    """Turns each step the callback hands over into a Frame (`make_frame`: x0, the pictures of
    every view, the host copies), in the order steps arrive.

    Threaded (the default): the step callback only queues references to the step's tensors,
    on CUDA after recording one event on the pipeline's stream, and a thread makes the frame:
    on CUDA on a side stream that first waits for that event, so it overlaps the next UNet step
    and the loop never syncs with the host or allocates host memory. Inline: the callback makes
    the frame before the loop goes on.
    Every view is decoded by the run's own decoder, one call per view: free with
    latent->RGB, cheap with the tiny VAE. With the full VAE it is a second VAE
    decode per step, kept so that the timeline's other view is as exact as the
    one streamed (the user asked for exact pictures). Measured: on the H100
    benchmark (SD 1.5, 512x512, fp16) a full-VAE preview cost 3.8 ms per 39 ms
    step over latent->RGB, mostly hidden on the side stream; on CPU with the micro
    model one decode costs about 0.8 of a UNet step, so two a step fell behind the
    UNet and the final image waited for that backlog: on a CPU the view not
    streamed is decoded later, and so is the streamed one of a step that a newer
    step (or the run's end) waits behind, or of every step when not `live`
    (`make_frame`'s `live`). One call per view rather than a batch
    of two: a batch saved ~10% on CPU, changes the pixels (different kernels), and
    doubles the decode's peak memory.
    """

    def __init__(self, make_frame, out: queue.Queue, device: torch.device, threaded: bool, live: bool = True):
        self._make, self._out, self._live_wanted = make_frame, out, live
        self._in: queue.Queue | None = queue.Queue() if threaded else None
        self._stream = torch.cuda.Stream(device) if threaded and device.type == "cuda" else None
        if threaded:
            threading.Thread(target=self._run, name="stepwise-decode", daemon=True).start()

    def submit(self, step: _Step) -> None:
        if self._in is None:
            self._out.put(self._make(step, self._live()))
            return
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self._in.put((step, ready, None))

    def finish(self, item) -> None:
        """Pass the run's end (final image, None when cancelled, or an error) on after the frames."""
        if self._in is None:
            self._out.put(item)
        else:
            self._in.put((None, None, item))

    def _live(self) -> bool:
        """Whether the step at hand is made live: `live` asked for, and no newer step waits behind it."""
        return self._live_wanted and (self._in is None or self._in.empty())

    def _run(self) -> None:
        while True:
            step, ready, end = self._in.get()
            if step is None:
                self._out.put(end)
                return
            try:
                with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                    if ready is not None:
                        self._stream.wait_event(ready)
                        for tensor in step.tensors():
                            if tensor.is_cuda:  # keep the allocator off it until the side stream is done with it
                                tensor.record_stream(self._stream)
                    self._out.put(self._make(step, self._live()))
            except Exception as err:  # noqa: BLE001 - surfaces in the caller's thread
                self._out.put(err)
                return


_EXITING = threading.Event()
threading._register_atexit(_EXITING.set)  # before non-daemon threads are joined (as concurrent.futures does)


def _make_all(frames: list[Frame]) -> None:
    """Make every picture of `frames` not yet made (`Deferred`), so that none holds its latents and
    decoder past the run; stops when the process exits. A decode that fails raises to whoever reads
    that picture."""
    for frame in frames:
        for copy in frame.decoded:
            if _EXITING.is_set():
                return
            try:
                copy.tensor()
            except Exception:  # noqa: BLE001 - the reader gets it
                pass


def _truncation_notes(pipe, family: Family, request: GenerationRequest) -> tuple[str, ...]:
    """Say what each text encoder cut off, as diffusers only logs it (`Family.text_tokens`:
    CLIP reads 77 tokens, T5 256 for SD3 and 512 for Flux, the end-of-text token included; a
    tokenizer with a shorter `model_max_length`, as the bundled model's 20, that many)."""
    notes = []
    for field in ("prompt", "negative_prompt"):
        for name, family_limit in family.text_tokens.items():
            tokenizer = getattr(pipe, name, None)
            if tokenizer is None:
                continue
            limit = min(family_limit, tokenizer.model_max_length)
            ids = tokenizer(getattr(request, field), truncation=False).input_ids
            if len(ids) > limit:
                cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
                note = f"{field}: {len(ids)} tokens, {family.encoder(name)} reads {limit}; cut off: “{cut}”"
                if note not in notes:  # SDXL's two CLIP tokenizers cut alike
                    notes.append(note)
    return tuple(notes)


def _unused_notes(pipe, request: GenerationRequest) -> tuple[str, ...]:
    """Say which depth-tab inputs a depth pipeline that starts from noise leaves unused (SD 3's
    ControlNet pipeline takes no image or strength)."""
    if request.mode != "depth2img" or "strength" in inspect.signature(pipe.__call__).parameters:
        return ()
    image = "only the depth map is used" if request.depth_map is not None else "only its estimated depth is used"
    return (f"strength: not used: {type(pipe).__name__} starts from noise; of the input image {image}",)


@contextlib.contextmanager
def _global_rng(seed: int | None):
    """torch's global generator seeded with `seed` for the block, and put back after (None: left alone).
    Runs hold `run_lock`, so no other run draws from it meanwhile."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _per_run(shared, scheduler):
    """A pipeline object of our own over the shared modules: its own scheduler and interrupt
    flag, no copies of weights (constructing one takes milliseconds). Built as `from_pipe`
    builds one, with the shared pipeline's config options (SDXL's force_zeros_for_empty_prompt,
    SD's requires_safety_checker), but without its `.to()` over every module on each run."""
    takes = inspect.signature(type(shared).__init__).parameters
    options = {k: v for k, v in shared.config.items() if k in takes and k not in shared.components}
    pipe = type(shared)(**{**shared.components, "scheduler": scheduler}, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latent_grid(pipe, request: GenerationRequest) -> tuple[int, int]:
    """(h, w) of the run's latents, unpacked: the image size over the VAE's downscale."""
    return request.height // pipe.vae_scale_factor, request.width // pipe.vae_scale_factor


def _depth_pixels(depth_mask: torch.Tensor) -> torch.Tensor:
    # depth_mask is already min-max scaled to [-1, 1] by the pipeline, one row per CFG half
    return to_pixels(depth_mask[:1].expand(-1, 3, -1, -1))

