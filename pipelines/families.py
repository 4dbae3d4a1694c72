"""Model families: everything that differs between SD 1.x/2.x, SDXL, SD 3 and Flux, in one table.

A family is chosen once, when a checkpoint loads, from the `_class_name` its
model_index.json records (`family_of`); the rest of Stepwise asks the `Family` and
never tests for a model kind itself. Adding a family is one new entry in `FAMILIES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Latent -> RGB maps (rows: latent channels; columns R, G, B) and biases, from ComfyUI's
# `comfy/latent_formats.py` (../shared/reference/FACTS.md). Applied to the latents as the
# sampler holds them (for SD3/Flux `(vae_latent - shift_factor) * scaling_factor`).
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177),
)
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
SD3_LATENT_RGB = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


@dataclass(frozen=True)
class LatentFormat:
    """How a family's sampler holds latents, and the published map to RGB for its real VAE."""

    channels: int  # 4 (SD, SDXL) or 16 (SD3, Flux)
    scaling_factor: float  # the real VAE's; latents = (vae_latent - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    packed: bool = False  # Flux: 2x2 latent patches packed into (B, h/2 * w/2, 4 C) tokens
    rgb: tuple[tuple[float, float, float], ...] = ()
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def is_published_vae(self, vae_config) -> bool:
        """Whether a VAE has this format's published latent space (a tiny or custom VAE does not:
        its map is fitted). The full-size VAEs of all four families have block_out_channels
        [128, 256, 512, 512] (their config.json files)."""
        return (vae_config.get("latent_channels") == self.channels
                and abs(float(vae_config.get("scaling_factor") or 0) - self.scaling_factor) < 1e-6
                and list(vae_config.get("block_out_channels") or ()) == [128, 256, 512, 512])


@dataclass(frozen=True)
class DepthRoute:
    """How a family runs the depth tab (input image + optional depth map + strength).

    Three kinds: the checkpoint is itself a depth model (SD 2-depth, FLUX.1-Depth-dev: `controlnet`
    None); the base checkpoint plus a depth ControlNet from `--controlnet` (SD 1.x, SDXL, SD 3); or
    none on this checkpoint (`pipeline` None: Flux.1 takes FLUX.1-Depth-dev with `--depth-model`).
    `flag` and `example` say what to pass when the route is missing. The pipeline's own call says how
    the depth goes in: `depth_map=` (SD 2-depth scales it itself) or `control_image=` (an RGB depth
    picture, pipelines/depth.py), and whether the run starts from the input image (`strength`) or
    from noise (SD 3: diffusers has no SD 3 ControlNet img2img pipeline).
    """

    pipeline: str | None  # diffusers class of the depth run
    controlnet: str | None = None  # diffusers class of the ControlNet it takes; None: no ControlNet
    # config keys the ControlNet must share with the base denoiser (UNet or transformer): its residuals are
    # added to the denoiser's blocks, and it reads the same text embeddings
    fits: tuple[str, ...] = ()
    flag: str = "--controlnet"
    example: str = ""
    # the pipeline samples the control image's latents from torch's global generator, not the run's
    # (diffusers' StableDiffusion3ControlNetPipeline: `vae.encode(control_image).latent_dist.sample()`);
    # the run seeds it from the request's seed, or the same seed would not give the same image
    global_rng: bool = False


@dataclass(frozen=True)
class Family:
    """What one model family needs from the rest of Stepwise."""

    name: str  # "sd", "sd-depth", "sdxl", "sd3", "flux", "flux-depth"
    label: str  # for messages: "SDXL"
    class_names: tuple[str, ...]  # model_index.json `_class_name`s that belong to it
    latents: LatentFormat
    flow_matching: bool = False  # x_t = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0
    modes: tuple[str, ...] = ("txt2img", "img2img")
    negative_prompt: bool = True  # False: the model has no negative conditioning (distilled guidance)
    distilled_guidance: bool = False  # Flux: guidance_scale is an input of the transformer, not CFG
    cuda_dtype: torch.dtype = torch.float16  # what it is trained and shipped in
    text_tokens: dict[str, int] = field(default_factory=dict)  # tokenizer attribute -> tokens the model reads
    t5_tokenizer: str | None = None  # which of them is T5's (the others are CLIP's)
    # the tokenizer whose tokens the attention maps show, and where they start in the text sequence the denoiser
    # attends to (SDXL's two CLIP tokenizers share their 77 positions: the first stands for both)
    attention_text: tuple[str, int] = ("tokenizer", 0)
    load_options: dict = field(default_factory=dict)  # from_pretrained / from_single_file keywords
    default_steps: int = 20
    default_guidance: float = 7.5
    default_scheduler: str = "Euler a"
    # what diffusers' `infer_diffusers_model_type` calls its single-file checkpoints
    # (diffusers/loaders/single_file_utils.py, `DIFFUSERS_DEFAULT_PIPELINE_PATHS` keys)
    single_file_types: tuple[str, ...] = ()
    depth: DepthRoute = DepthRoute(None)

    def encoder(self, tokenizer: str) -> str:
        """The text encoder a tokenizer attribute of `text_tokens` feeds: "T5" or "CLIP"."""
        return "T5" if tokenizer == self.t5_tokenizer else "CLIP"

    def size_multiple(self, pipe) -> int:
        """Width and height must be multiples of this many pixels: the VAE's downscale times the
        transformer's patch size (SD3) or Flux's 2x2 packing, and at least 8, which every
        diffusers SD pipeline checks (`check_inputs`): 8 for SD and SDXL, 16 for SD3 and Flux."""
        transformer = getattr(pipe, "transformer", None)
        patch = 2 if self.latents.packed else transformer.config.get("patch_size", 1) if transformer else 1
        return math.lcm(8, pipe.vae_scale_factor * patch)

    def native_side(self, pipe) -> int:
        """The image side the model was trained at, in pixels (512 SD 1.5, 1024 SDXL/SD3/Flux)."""
        latent_side = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        return latent_side * pipe.vae_scale_factor

    def unpack(self, latents: torch.Tensor, pipe, width: int, height: int) -> torch.Tensor:
        """The sampler's latents as (B, C, h, w): Flux's packed tokens unpacked, others as they are."""
        if not self.latents.packed:
            return latents
        return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)


_CLIP = {"tokenizer": 77}
# img2img ControlNet pipelines where diffusers has them, so strength means what it means for SD 2-depth
_UNET_CONTROLNET = ("cross_attention_dim", "block_out_channels", "addition_embed_type")
SD_DEPTH = DepthRoute("StableDiffusionControlNetImg2ImgPipeline", "ControlNetModel", _UNET_CONTROLNET,
                      example="lllyasviel/control_v11f1p_sd15_depth (SD 1.5), or an SD 2-depth checkpoint such as "
                              "stabilityai/stable-diffusion-2-depth with --depth-model")
SDXL_DEPTH = DepthRoute("StableDiffusionXLControlNetImg2ImgPipeline", "ControlNetModel", _UNET_CONTROLNET,
                        example="diffusers/controlnet-depth-sdxl-1.0")
# diffusers has no SD 3 ControlNet img2img pipeline: the run starts from noise
SD3_DEPTH = DepthRoute("StableDiffusion3ControlNetPipeline", "SD3ControlNetModel",
                       ("patch_size", "num_attention_heads", "attention_head_dim"), global_rng=True,
                       example="stabilityai/stable-diffusion-3.5-large-controlnet-depth")
FLUX_DEPTH = "black-forest-labs/FLUX.1-Depth-dev"
FAMILIES: tuple[Family, ...] = (
    Family("sd", "SD 1.x/2.x", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
           LatentFormat(4, 0.18215, rgb=SD_LATENT_RGB), text_tokens=_CLIP, single_file_types=("v1", "v2"),
           load_options={"safety_checker": None, "requires_safety_checker": False},  # watching, not filtering
           depth=SD_DEPTH),
    Family("sd-depth", "SD 2-depth", ("StableDiffusionDepth2ImgPipeline",),
           LatentFormat(4, 0.18215, rgb=SD_LATENT_RGB), modes=("depth2img",), text_tokens=_CLIP,
           depth=DepthRoute("StableDiffusionDepth2ImgPipeline")),
    Family("sdxl", "SDXL", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
           LatentFormat(4, 0.13025, rgb=SDXL_LATENT_RGB, rgb_bias=SDXL_LATENT_RGB_BIAS),
           text_tokens={"tokenizer": 77, "tokenizer_2": 77}, default_steps=30, default_guidance=5.0,
           default_scheduler="Euler", single_file_types=("xl_base",), depth=SDXL_DEPTH),
    Family("sd3", "SD 3", ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
           LatentFormat(16, 1.5305, 0.0609, rgb=SD3_LATENT_RGB, rgb_bias=SD3_LATENT_RGB_BIAS),
           flow_matching=True, cuda_dtype=torch.bfloat16, default_steps=28, default_guidance=7.0,
           default_scheduler="Euler", text_tokens={"tokenizer": 77, "tokenizer_2": 77, "tokenizer_3": 256},
           t5_tokenizer="tokenizer_3",
           # the text is CLIP's 77 positions (CLIP-L and CLIP-G side by side) then T5's 256; T5's are mapped: it
           # reads prompts past CLIP's 77 tokens, the SD 3 paper finds it carries complex prompts and written text,
           # and Flux's maps are T5 tokens too
           attention_text=("tokenizer_3", 77),
           single_file_types=("sd3", "sd35_medium", "sd35_large"), depth=SD3_DEPTH),
    Family("flux", "Flux.1", ("FluxPipeline", "FluxImg2ImgPipeline"),
           LatentFormat(16, 0.3611, 0.1159, packed=True, rgb=FLUX_LATENT_RGB, rgb_bias=FLUX_LATENT_RGB_BIAS),
           flow_matching=True, negative_prompt=False, distilled_guidance=True, cuda_dtype=torch.bfloat16,
           default_steps=28, default_guidance=3.5, default_scheduler="Euler",
           text_tokens={"tokenizer": 77, "tokenizer_2": 512}, t5_tokenizer="tokenizer_2",
           attention_text=("tokenizer_2", 0),  # the text is T5's alone (CLIP gives only a pooled vector)
           single_file_types=("flux-dev", "flux-schnell"),
           depth=DepthRoute(None, flag="--depth-model", example=FLUX_DEPTH)),
    # FLUX.1-Depth-dev: Flux with the depth picture's latents concatenated to its input (in_channels doubled)
    Family("flux-depth", "Flux.1 Depth", ("FluxControlPipeline", "FluxControlImg2ImgPipeline"),
           LatentFormat(16, 0.3611, 0.1159, packed=True, rgb=FLUX_LATENT_RGB, rgb_bias=FLUX_LATENT_RGB_BIAS),
           flow_matching=True, modes=("depth2img",), negative_prompt=False, distilled_guidance=True,
           cuda_dtype=torch.bfloat16, default_steps=28, default_guidance=10.0, default_scheduler="Euler",
           text_tokens={"tokenizer": 77, "tokenizer_2": 512}, t5_tokenizer="tokenizer_2",
           attention_text=("tokenizer_2", 0), depth=DepthRoute("FluxControlImg2ImgPipeline")),
)
# for messages: "SD 1.x/2.x (v1, v2); SDXL (xl_base); ..."
SINGLE_FILE_KINDS = "; ".join(f"{f.label} ({', '.join(f.single_file_types)})" for f in FAMILIES if f.single_file_types)


class UnknownFamily(ValueError):
    """A checkpoint of a pipeline class no family owns."""


def family_of(class_name: str) -> Family:
    """The family owning a model_index.json `_class_name`. Raises `UnknownFamily` naming the
    classes Stepwise runs."""
    for family in FAMILIES:
        if class_name in family.class_names:
            return family
    known = ", ".join(name for f in FAMILIES for name in f.class_names)
    raise UnknownFamily(f"a {class_name} checkpoint; Stepwise runs {known} checkpoints")


def family_of_single_file(model_type: str) -> Family:
    """The family whose single files diffusers calls `model_type`. Raises `UnknownFamily` naming
    the types Stepwise runs."""
    for family in FAMILIES:
        if model_type in family.single_file_types:
            return family
    raise UnknownFamily(f"a {model_type!r} checkpoint (diffusers' name for it); Stepwise runs single files of "
                        f"{SINGLE_FILE_KINDS}")


def family_named(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)

