"""Every loaded model lives here, once.

Sources (`--model` / `--depth-model` / `--controlnet` / `--depth-estimator`):
- `bundled` (the default): `models/micro` when it is present; before that, a tiny
  random-weight checkpoint built from configs into the Stepwise cache folder and
  labelled untrained.
- a local diffusers folder;
- a Hugging Face hub repo id, loaded through the HF cache. `HF_HUB_OFFLINE=1` is
  honoured; a model that is neither cached nor downloadable gives `ModelLoadError`
  naming the model and how to provide it;
- a single `.safetensors` / `.ckpt` checkpoint file, loaded with diffusers'
  `from_single_file` and the configs `pipelines.sources.single_file_source` finds.

The depth tab runs the family's `DepthRoute` (pipelines/families.py): the checkpoint itself
(SD 2-depth, FLUX.1-Depth-dev), the bundled layout's depth UNet, or the checkpoint plus the
`--controlnet` ControlNet; its depth estimator is `--depth-estimator` or the layout's
`depth_estimator/`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderTiny,
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionDepth2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import DPTForDepthEstimation, DPTImageProcessor

from .choices import PREVIEW_MODES
from .depth import DepthEstimator
from .devices import memory_bytes, pick_device, pick_dtype, use_fastest_attention
from .families import DepthRoute, Family, UnknownFamily, family_of
from .layout import BUNDLED, BUNDLED_FOLDER, DEPTH_ESTIMATOR, DEPTH_UNET, has_depth, is_pipeline, tiny_vae_folder
from .previews import LatentRGB, VAEDecoder, latent_rgb_for
from .protocol import ModelLoadError
from .request import MODES, Limits
from .schedulers import scheduler_menu
from .sources import SINGLE_FILE_SUFFIXES, is_single_file, single_file_source
from .tiny import save_tiny_checkpoint

log = logging.getLogger(__name__)
# diffusers warns at every `.to()` of a model class that may keep modules in float32, even when it keeps
# none ("...kept in float32: []"); SDXL img2img and depth2img move their VAE so on every run
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())

OFFLOAD = ("model", "sequential")  # --offload: accelerate's CPU offload kinds



def stepwise_cache_dir() -> Path:
    return Path(os.environ.get("STEPWISE_CACHE", Path.home() / ".cache" / "stepwise"))


def bundled_folder() -> Path:
    """models/micro once it is trained; until then a tiny random checkpoint."""
    if is_pipeline(BUNDLED_FOLDER):
        return BUNDLED_FOLDER
    folder = stepwise_cache_dir() / "untrained-tiny"
    if not is_pipeline(folder):
        log.info("building the untrained tiny default model in %s", folder)
        save_tiny_checkpoint(folder)
    return folder


def resolve_local(source: str) -> Path | None:
    """The local folder a source names, or None for a hub repo id."""
    if source == BUNDLED:
        return bundled_folder()
    path = Path(source).expanduser()
    if path.is_file() or is_single_file(source):
        why = "no such file" if not path.exists() else f"not a {' or '.join(SINGLE_FILE_SUFFIXES)} checkpoint"
        raise ModelLoadError(f"model {source!r}: {why}; --model takes a diffusers folder, a hub repo id or a "
                             f"single {' / '.join(SINGLE_FILE_SUFFIXES)} checkpoint file")
    if path.is_dir():
        if not is_pipeline(path):
            raise ModelLoadError(f"{source!r} is a folder but not a diffusers pipeline (it has no model_index.json)")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(
            f"model {source!r} is neither a local folder nor a hub repo id like 'org/name'; "
            "pass an existing folder or a repo id"
        )
    return None


def _family(source: str, where: str) -> Family:
    """The family of the checkpoint, from the class its model_index.json records (a small file;
    from the HF cache for a hub id), never from what the first caller asked for."""
    name = DiffusionPipeline.load_config(where).get("_class_name")
    try:
        return family_of(name)
    except UnknownFamily as err:
        raise ModelLoadError(f"{source!r} is {err}") from None


def _compile(pipe: DiffusionPipeline) -> None:
    """torch.compile the UNet with channels_last (worth it on GPUs; the first run
    pays the compile). Pipelines derived later share the compiled module."""
    pipe.unet.to(memory_format=torch.channels_last)
    # default mode: "max-autotune-no-cudagraphs" was still autotuning SD 1.5 on an H100 when a 10-minute run ended
    pipe.unet.compile()  # in place: the module object (and sharing) stays


def param_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of `modules` (shared tensors count once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass
class Checkpoint:
    """One loaded checkpoint and every pipeline built on its modules."""

    source: str
    folder: Path | None
    family: Family
    pipelines: dict[str, DiffusionPipeline]
    latent_rgb: LatentRGB
    tiny_vae: VAEDecoder | None = None
    attention: str = "sdpa"
    extra_modules: list[torch.nn.Module] = field(default_factory=list)
    offloaded: bool = False  # --offload: weights move to the GPU per model or layer
    controlnet: str | None = None  # --controlnet: the depth ControlNet source, for families whose route takes one
    depth_estimator: DepthEstimator | None = None  # loaded on the first run that estimates depth
    runs: int = 0  # runs using it now (`ModelCache.running`); never evicted while > 0

    @property
    def base(self) -> DiffusionPipeline:
        return next(iter(self.pipelines.values()))

    def decoder(self, preview: str):
        """The preview decoder by name ("latent-rgb", "tiny-vae", "full-vae")."""
        if preview == "tiny-vae" and self.tiny_vae is None:
            raise ValueError(f"preview 'tiny-vae' needs a tiny autoencoder; {self.source!r} has none configured")
        if preview == "full-vae":
            return self.full_vae
        return {"latent-rgb": self.latent_rgb, "tiny-vae": self.tiny_vae}[preview]

    @cached_property
    def full_vae(self) -> VAEDecoder:
        """The checkpoint's own VAE as a preview decoder (every pipeline of it shares the base's VAE);
        made once: an fp16 VAE that must upcast keeps its float32 copy here."""
        return VAEDecoder(self.base.vae)

    @property
    def native_side(self) -> int:
        """The image side the checkpoint was trained at, in pixels: the denoiser's sample size
        (latent side) times the VAE's scale factor; 512 for SD 1.5, 1024 for SDXL, 64 for the micro model."""
        return self.family.native_side(self.base)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this checkpoint runs: its family's, and depth2img where the bundled layout has a depth UNet
        or a `--controlnet` is given for a family whose depth route takes one."""
        depth = (self.folder is not None and has_depth(self.folder)) or bool(self.controlnet
                                                                            and self.family.depth.controlnet)
        return tuple(m for m in MODES if m in self.family.modes or (m == "depth2img" and depth))

    def unavailable(self) -> dict[str, str]:
        """{mode this checkpoint cannot run: what to pass instead}."""
        why = {}
        for mode in MODES:
            if mode in self.modes:
                continue
            if mode == "depth2img":
                why[mode] = _no_depth_route(self)
            else:
                why[mode] = (f"{self.source!r} is a depth model ({type(self.base).__name__}); it runs only "
                             "depth2img: pass it with --depth-model, and a text-to-image checkpoint with --model")
        return why

    def limits(self) -> Limits:
        """What runs on this checkpoint may ask for. Sides from 1/8 to 4x the native side
        (64..2048 for SD 1.5, as AUTOMATIC1111's sliders) in the family's size multiple, at most
        4x its native pixel count; only the preview decoders it has and the samplers that fit its
        noise model."""
        native, multiple = self.native_side, self.family.size_multiple(self.base)
        menus = {mode: scheduler_menu(self.base.scheduler.config, mode, self.family.flow_matching)
                 for mode in MODES}
        return Limits(
            min_side=max(16, multiple, native // 8 // multiple * multiple),
            max_side=min(2048, 4 * native),
            max_pixels=4 * native * native,
            size_multiple=multiple,
            modes=self.modes,
            unavailable_modes=self.unavailable(),
            negative_prompt=self.family.negative_prompt,
            distilled_guidance=self.family.distilled_guidance,
            # FLUX.1-schnell: distilled to run without guidance, its transformer has no guidance input
            guidance_ignored=self.family.distilled_guidance and not self.base.transformer.config.guidance_embeds,
            family=self.family.label,
            # offloaded, a full-VAE preview would move the denoiser off the GPU at every step
            preview_modes=tuple(m for m in PREVIEW_MODES if (m != "tiny-vae" or self.tiny_vae is not None)
                                and (m != "full-vae" or not self.offloaded)),
            schedulers=menus["txt2img"][0],
            unfit_schedulers={mode: unfit for mode, (_, unfit) in menus.items()},
        )

    def nbytes(self) -> int:
        modules = [m for p in self.pipelines.values() for m in p.components.values() if isinstance(m, torch.nn.Module)]
        return param_bytes(*modules, *self.extra_modules)


class ModelCache:
    """Loads each checkpoint once and hands out pipelines that share its modules.

    - Sharing: img2img is `from_pipe` of txt2img, so both hold the very same
      UNet, VAE and text encoder. A bundled-layout depth model reuses its family's
      VAE, text encoder and tokenizer and adds only its depth UNet and estimator.
    - Key: (source, device, dtype). A source's `Family` comes from the class its
      model_index.json records (or, for a single file, its tensors), never from the
      mode asked for first; txt2img loads through `AutoPipelineForText2Image`,
      img2img and ControlNet depth runs are `from_pipe` of it. Asking a checkpoint for
      a mode it cannot run is a `ModelLoadError` naming the flag to pass.
    - Lock: one re-entrant lock around lookups and loads, so two requests for a
      cold model load it once. Runs use the pipelines outside the lock.
    - Running: `run_lock` lets one run use the device at a time (the UI also
      serializes GPU events in one Gradio concurrency group).
    - Eviction: least recently used first, once the parameter bytes of all
      entries pass `budget_bytes` (default: half the device's memory). The entry
      just asked for always stays, and so does every checkpoint a run is using
      (`running`): the cache may pass its budget until that run ends, then the
      checkpoint is evicted if it is still over.
    - Single files: `single_file_config` (`--config`) is the diffusers folder or
      hub id whose configs describe every single-file checkpoint; without it,
      each file's default config repo from the HF cache.
    - Device: cuda, then mps, then cpu; on CUDA the family's dtype (fp16 for SD and
      SDXL, bf16 for SD 3 and Flux) unless `dtype` is given, else fp32; `offload`
      ("model" or "sequential", CUDA only) hands placement to accelerate's CPU offload
      instead (untested here: no GPU in CI); SDPA attention, xformers only where it is
      installed and runs on the device.
      Previews decode on their own thread, overlapping the next UNet step (on
      CUDA on a side stream); `overlap_decode=False` decodes inline in the step
      callback. benchmarks/ compares the two.
    """

    def __init__(self, device: str | None = None, dtype: str | None = None, budget_bytes: int | None = None,
                 tiny_vae: str | None = None, compile_unet: bool = False, overlap_decode: bool = True,
                 offload: str | None = None, single_file_config: str | None = None, controlnet: str | None = None,
                 depth_estimator: str | None = None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self._dtype_asked = dtype is not None
        if offload not in (None, *OFFLOAD):
            raise ValueError(f"offload {offload!r}: choose one of {', '.join(OFFLOAD)}")
        if offload and self.device.type != "cuda":
            raise ValueError(f"--offload {offload} moves weights between CPU and a GPU; this run has no CUDA device "
                             f"({self.device.type}): leave --offload out")
        self.offload = offload
        self.budget_bytes = budget_bytes if budget_bytes is not None else memory_bytes(self.device) // 2
        self.tiny_vae_source = tiny_vae
        self.single_file_config = single_file_config
        self.controlnet_source = controlnet
        self.depth_estimator_source = depth_estimator
        self.compile_unet = compile_unet
        # decode previews on a thread (a side stream on CUDA) that overlaps the next step
        self.overlap_decode = overlap_decode
        self._entries: OrderedDict[tuple, Checkpoint] = OrderedDict()
        self._lock = threading.RLock()
        self.run_lock = threading.Lock()

    # -- public -------------------------------------------------------------
    def pipeline(self, mode: str, source: str = BUNDLED) -> DiffusionPipeline:
        """The shared pipeline for `mode` ("txt2img", "img2img", "depth2img")."""
        with self._lock:
            entry = self.checkpoint(source)
            if mode not in entry.pipelines:
                entry.pipelines[mode] = self._derive(entry, mode)
            return entry.pipelines[mode]

    def checkpoint(self, source: str = BUNDLED) -> Checkpoint:
        """The loaded checkpoint of `source` (loads it on first use). Raises `ModelLoadError`."""
        key = (source, str(self.device), self.dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._load(source)
                self._entries[key] = entry
                self._evict(keep=key)
            self._entries.move_to_end(key)
            return entry

    @contextlib.contextmanager
    def running(self, source: str = BUNDLED) -> Iterator[Checkpoint]:
        """Hold `source`'s checkpoint (loading it) for the length of a run: it is not evicted
        until the block ends; then the budget is enforced again."""
        with self._lock:
            entry = self.checkpoint(source)
            entry.runs += 1
        try:
            yield entry
        finally:
            with self._lock:
                entry.runs -= 1
                if self._entries:
                    self._evict(keep=next(reversed(self._entries)))

    def estimator(self, source: str = BUNDLED) -> DepthEstimator:
        """The depth estimator for depth runs on `source`: `--depth-estimator`, else the checkpoint
        folder's `depth_estimator/`; loaded once per checkpoint. Raises ModelLoadError naming the
        flag when there is none."""
        with self._lock:
            entry = self.checkpoint(source)
            if entry.depth_estimator is None:
                where = self.depth_estimator_source
                if where is None and entry.folder is not None and (entry.folder / DEPTH_ESTIMATOR).is_dir():
                    where = str(entry.folder / DEPTH_ESTIMATOR)
                if where is None:
                    raise ModelLoadError(
                        f"depth_map: {source!r} has no depth estimator; upload a depth map, or start Stepwise with "
                        "--depth-estimator (a DPT or Depth Anything folder or hub id, e.g. "
                        "depth-anything/Depth-Anything-V2-Small-hf)")
                try:
                    entry.depth_estimator = DepthEstimator.load(where, entry.base.dtype, self.device)
                except (OSError, ValueError) as err:
                    raise ModelLoadError(self._load_hint(where, err, local=Path(where).is_dir())) from err
                entry.extra_modules += entry.depth_estimator.modules
            return entry.depth_estimator

    def loaded(self) -> list[str]:
        with self._lock:
            return [key[0] for key in self._entries]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes() for e in self._entries.values())

    # -- loading ------------------------------------------------------------
    def _load(self, source: str) -> Checkpoint:
        if is_single_file(source) and Path(source).expanduser().is_file():
            return self._load_single_file(source)
        folder = resolve_local(source)
        where = str(folder) if folder else source
        try:
            family = _family(source, where)
            dtype = self.dtype_for(family)
            if family.modes == ("depth2img",):  # a depth checkpoint: its route's pipeline class
                mode, pipe = "depth2img", getattr(diffusers, family.depth.pipeline).from_pretrained(where, dtype=dtype)
            else:
                # the family's text-to-image class, whichever variant the folder records
                mode, pipe = "txt2img", AutoPipelineForText2Image.from_pretrained(where, dtype=dtype,
                                                                                   **family.load_options)
        except (OSError, ValueError) as err:
            raise ModelLoadError(self._load_hint(source, err, local=folder is not None)) from err
        return self._checkpoint(source, folder, family, mode, pipe)

    def _load_single_file(self, source: str) -> Checkpoint:
        path = Path(source).expanduser()
        family, configs = single_file_source(path, self.single_file_config)
        if family.modes == ("depth2img",):
            raise ModelLoadError(f"{source!r}: single-file {family.label} checkpoints are not supported; "
                                 "pass a diffusers folder or hub id with --depth-model")
        pipeline_class = getattr(diffusers, family.class_names[0])  # the family's text-to-image class
        try:
            pipe = pipeline_class.from_single_file(str(path), config=str(configs), dtype=self.dtype_for(family),
                                                   local_files_only=True, **family.load_options)
        except Exception as err:  # noqa: BLE001 - conversion raises ValueError, RuntimeError (shapes), its own errors
            raise ModelLoadError(f"could not load {source!r} as {family.label} with the configs in {configs}: {err}; "
                                 "pass --config with a diffusers folder of the checkpoint's architecture") from err
        return self._checkpoint(source, None, family, "txt2img", pipe)

    def _checkpoint(self, source: str, folder: Path | None, family: Family, mode: str,
                    pipe: DiffusionPipeline) -> Checkpoint:
        pipe.set_progress_bar_config(disable=True)
        pipe = self._place(pipe)
        attention = use_fastest_attention(pipe, self.device)
        if self.compile_unet:
            _compile(pipe)
        entry = Checkpoint(
            source=source,
            folder=folder,
            family=family,
            pipelines={mode: pipe},
            latent_rgb=latent_rgb_for(folder, pipe.vae, family.latents),
            attention=attention,
            offloaded=self.offload is not None,
            controlnet=self.controlnet_source,
        )
        entry.tiny_vae = self._load_tiny_vae(folder, pipe.dtype)
        if entry.tiny_vae is not None:
            entry.extra_modules.append(entry.tiny_vae.vae)
        return entry

    def dtype_for(self, family: Family) -> torch.dtype:
        """--dtype when given; else on CUDA the dtype the family ships in (bf16 for SD3 and Flux,
        fp16 for SD and SDXL), fp32 elsewhere."""
        if self._dtype_asked or self.device.type != "cuda":
            return self.dtype
        return family.cuda_dtype

    def _place(self, pipe: DiffusionPipeline) -> DiffusionPipeline:
        """On the device, or offloaded through accelerate (`--offload`): "model" keeps one whole model
        on the GPU at a time, "sequential" one layer (slowest, least memory)."""
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe = pipe.to(self.device)
        return pipe

    def _load_tiny_vae(self, folder: Path | None, dtype: torch.dtype) -> VAEDecoder | None:
        source = self.tiny_vae_source or (tiny_vae_folder(folder) if folder else None)
        if source is None:
            return None
        try:
            vae = AutoencoderTiny.from_pretrained(str(source), dtype=dtype).to(self.device)
        except (OSError, ValueError) as err:
            raise ModelLoadError(self._load_hint(str(source), err, local=Path(source).is_dir())) from err
        return VAEDecoder(vae)

    def _derive(self, entry: Checkpoint, mode: str) -> DiffusionPipeline:
        base = entry.base
        if mode in ("txt2img", "img2img"):
            if mode not in entry.family.modes:
                raise ModelLoadError(entry.unavailable()[mode])
            auto = AutoPipelineForText2Image if mode == "txt2img" else AutoPipelineForImage2Image
            pipe = auto.from_pipe(base)
        elif entry.controlnet and entry.family.depth.controlnet:
            route = entry.family.depth
            pipe = getattr(diffusers, route.pipeline).from_pipe(base, controlnet=self._controlnet(entry, route))
            pipe = self._place(pipe)
            use_fastest_attention(pipe, self.device)
        else:
            folder = entry.folder
            if "depth2img" not in entry.modes:
                raise ModelLoadError(entry.unavailable()["depth2img"])
            unet = UNet2DConditionModel.from_pretrained(folder / DEPTH_UNET, dtype=base.dtype)
            estimator = DPTForDepthEstimation.from_pretrained(folder / DEPTH_ESTIMATOR, dtype=base.dtype)
            pipe = StableDiffusionDepth2ImgPipeline(
                vae=base.vae,
                text_encoder=base.text_encoder,
                tokenizer=base.tokenizer,
                unet=unet,
                scheduler=base.scheduler,
                depth_estimator=estimator,
                feature_extractor=DPTImageProcessor.from_pretrained(folder / DEPTH_ESTIMATOR),
            )
            pipe = self._place(pipe)
            use_fastest_attention(pipe, self.device)
            if self.compile_unet:
                _compile(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _controlnet(self, entry: Checkpoint, route: DepthRoute) -> torch.nn.Module:
        """`--controlnet`, checked against the base denoiser's config before its weights load.
        Raises ModelLoadError naming both models and what differs."""
        source, label = entry.controlnet, entry.family.label
        model_class = getattr(diffusers, route.controlnet)
        local = Path(source).expanduser().is_dir()
        try:
            config = model_class.load_config(source)
        except (OSError, ValueError) as err:
            raise ModelLoadError(self._load_hint(source, err, local)) from err
        advice = f"pass a depth ControlNet made for {label} with --controlnet, e.g. {route.example}"
        if config.get("_class_name") != route.controlnet:
            raise ModelLoadError(f"--controlnet {source!r} is a {config.get('_class_name')}, which does not fit "
                                 f"{entry.source!r} ({label} takes a {route.controlnet}); {advice}")
        denoiser = entry.base.unet if hasattr(entry.base, "unet") else entry.base.transformer
        differ = [(key, _plain(config.get(key)), _plain(denoiser.config.get(key))) for key in route.fits
                  if _plain(config.get(key)) != _plain(denoiser.config.get(key))]
        if differ:
            what = "; ".join(f"{key} {mine} vs {theirs}" for key, mine, theirs in differ)
            raise ModelLoadError(f"--controlnet {source!r} does not fit {entry.source!r} ({label}): ControlNet vs "
                                 f"{type(denoiser).__name__}: {what}; {advice}")
        try:
            return model_class.from_pretrained(source, dtype=entry.base.dtype)
        except (OSError, ValueError) as err:
            raise ModelLoadError(self._load_hint(source, err, local)) from err

    def free_memory(self) -> None:
        """Hand cached, unused device memory back (after an eviction or an OOM)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _evict(self, keep: tuple) -> None:
        evicted = False
        while self.total_bytes() > self.budget_bytes:
            oldest = next((k for k, e in self._entries.items() if k != keep and e.runs == 0), None)
            if oldest is None:  # the rest are running: over budget until their runs end
                break
            log.info("evicting %s to stay under the %d-byte budget", oldest[0], self.budget_bytes)
            del self._entries[oldest]
            evicted = True
        if evicted:
            self.free_memory()

    @staticmethod
    def _load_hint(source: str, err: Exception, local: bool) -> str:
        if local:
            return f"could not load model {source!r}: {err}"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such repo"
        return (
            f"model {source!r} is not in the local Hugging Face cache and {why}. "
            f"On a connected machine run `hf download {source}` and copy the HF cache "
            f"(~/.cache/huggingface) here, or pass a local diffusers folder with --model PATH. ({err})"
        )


def _plain(value):
    """A config value as JSON gives it back (tuples as lists), for comparing a saved config with a live one."""
    return list(value) if isinstance(value, tuple) else value


def _no_depth_route(entry: Checkpoint) -> str:
    """What to pass for depth runs on a checkpoint that has no depth route."""
    route, label = entry.family.depth, entry.family.label
    if route.controlnet is None:  # the family's depth model is a checkpoint of its own
        ignored = f" (--controlnet {entry.controlnet!r} does not apply to {label})" if entry.controlnet else ""
        return (f"{entry.source!r} ({label}) has no depth model{ignored}; pass a depth checkpoint such as "
                f"{route.example} with {route.flag}")
    return (f"{entry.source!r} ({label}) has no depth model; pass a depth ControlNet for {label} with "
            f"{route.flag}, e.g. {route.example}")
