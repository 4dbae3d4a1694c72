"""Full-size SDXL (1024x1024, 30 steps) and FLUX.1 schnell (1024x1024, 4 steps) with random weights, on a CUDA GPU.

    python -m benchmarks.gpu_families [--repeats 3] [--json benchmarks/results-gpu-families.json]
    python -m benchmarks.gpu_families --tiny     # CPU smoke test: the tiny configs, 64x64, 2 steps

Speed does not depend on weight values, so these time like the real checkpoints. The
architectures are the published config.json values of stabilityai/stable-diffusion-xl-base-1.0
(UNet, VAE, CLIP ViT-L text_encoder, OpenCLIP bigG text_encoder_2) and
black-forest-labs/FLUX.1-schnell (transformer: 19 double-stream + 38 single-stream blocks,
24 heads x 128 = 3072 hidden; VAE; CLIP ViT-L; T5-XXL encoder, d_model 4096); the tokenizers
are the tiny ones (speed does not depend on the vocabulary; ids stay below vocab_size).
Weights are made on the GPU in the family's dtype (fp16 SDXL, bf16 Flux), written to a
folder and loaded through `ModelCache` as the app does: Flux is ~34 GB on disk and ~35 GB
of GPU memory, SDXL ~7 GB. Rows: the bare diffusers call (no callback) and the app path
(`generate`, every step decoded) with latent-rgb and tiny-VAE previews (TAESDXL / TAEF1 layout).
`--tiny` swaps in `pipelines.tiny`'s configs to prove the code runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pipelines import ModelCache, generate, layout, validate_request
from pipelines.families import family_named
from pipelines.tiny import tiny_flux, tiny_sdxl, tiny_t5_tokenizer, tiny_tokenizer

from .gpu import timed
from .run import bare_run

# (family, label, side, steps, guidance): SDXL at its usual 30 steps; schnell at its distilled 4, guidance 0
RUNS = (("sdxl", "SDXL", 1024, 30, 5.0), ("flux", "FLUX.1 schnell", 1024, 4, 0.0))
# FLUX.1-schnell scheduler/scheduler_config.json
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                         base_image_seq_len=256, max_image_seq_len=4096)


def _vae(latent_channels: int, scaling_factor: float, **kw) -> AutoencoderKL:
    """The SDXL / Flux VAE layout (vae/config.json of both)."""
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=latent_channels,
                         scaling_factor=scaling_factor, norm_num_groups=32, sample_size=1024, **kw)


def _clip(tokenizer, projection: bool = False, **config):
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **ids, **config)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


# text_encoder/config.json: CLIP ViT-L/14 (SDXL and Flux)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
# SDXL text_encoder_2/config.json: OpenCLIP ViT-bigG/14
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")


def sdxl_scheduler() -> EulerDiscreteScheduler:  # scheduler/scheduler_config.json
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="leading")


def schnell_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER)


def full_sdxl(scheduler) -> tuple[StableDiffusionXLPipeline, AutoencoderTiny]:
    unet = UNet2DConditionModel(  # unet/config.json
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(4, 0.13025, force_upcast=True), text_encoder=_clip(tokenizer, **CLIP_L),
        text_encoder_2=_clip(tokenizer_2, projection=True, **CLIP_BIG_G), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler,
    )
    return pipe, AutoencoderTiny(latent_channels=4)  # TAESDXL: the default 64-channel layout


def full_flux_schnell(scheduler) -> tuple[FluxPipeline, AutoencoderTiny]:
    transformer = FluxTransformer2DModel(  # transformer/config.json
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(  # text_encoder_2/config.json: T5 v1.1 XXL encoder
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(16, 0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, **CLIP_L), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
    )
    return pipe, AutoencoderTiny(latent_channels=16)  # TAEF1: the default 64-channel layout, 16 latent channels


def tiny_sdxl_with(scheduler) -> tuple[StableDiffusionXLPipeline, AutoencoderTiny]:
    pipe, tiny_vae = tiny_sdxl()
    return StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler}), tiny_vae


def tiny_flux_schnell(scheduler) -> tuple[FluxPipeline, AutoencoderTiny]:
    """`pipelines.tiny.tiny_flux` with schnell's differences: no guidance input, schnell's scheduler."""
    pipe, tiny_vae = tiny_flux()
    transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    return FluxPipeline(**{**pipe.components, "transformer": transformer, "scheduler": scheduler}), tiny_vae


# (family, full size) -> (scheduler, builder of (pipeline, tiny VAE) around it)
BUILDERS = {("sdxl", True): (sdxl_scheduler, full_sdxl), ("flux", True): (schnell_scheduler, full_flux_schnell),
            ("sdxl", False): (sdxl_scheduler, tiny_sdxl_with), ("flux", False): (schnell_scheduler, tiny_flux_schnell)}


@contextlib.contextmanager
def _made_on(device: str, dtype: torch.dtype):
    """Modules built inside are allocated (and randomly initialised) on `device` in `dtype`: 17 B
    parameters of Flux would take minutes and 68 GB to make in fp32 on the CPU."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def save_checkpoint(folder: Path, family: str, full: bool, device: str, dtype: torch.dtype) -> Path:
    make_scheduler, build = BUILDERS[(family, full)]
    scheduler = make_scheduler()  # outside: a scheduler keeps its float32 tables on the CPU
    torch.manual_seed(0)
    with _made_on(device, dtype):
        pipe, tiny_vae = build(scheduler)
    pipe.save_pretrained(folder)
    layout.save_tiny_vae(folder, tiny_vae)
    return folder


def gpu_families_section(full: bool | None = None, repeats: int = 3, on_row=None) -> dict:
    """Bare vs app path rows for full-size SDXL and FLUX.1 schnell. full: None = full size when CUDA is
    there; False = the tiny configs at 64x64, 2 steps (on CPU: proves the code runs). Raises
    RuntimeError when asked for full size without CUDA (it would take hours and ~70 GB of RAM)."""
    cuda = torch.cuda.is_available()
    full = cuda if full is None else full
    if full and not cuda:
        raise RuntimeError("full-size SDXL and Flux need a CUDA GPU; pass --tiny to smoke-test on CPU")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    for family, label, side, steps, guidance in RUNS:
        if not full:
            side, steps = 64, 2
        cache = ModelCache(device=device)
        dtype = cache.dtype_for(family_named(family)) if cuda else torch.float32
        folder = save_checkpoint(Path(tempfile.mkdtemp()) / family, family, full, device, dtype)
        source = str(folder)
        limits = cache.checkpoint(source).limits()
        base = dict(mode="txt2img", prompt="a photo of a cat", seed=1, steps=steps, guidance_scale=guidance,
                    width=side, height=side, scheduler="Euler", view="x0")
        bare_req = validate_request(dict(base, preview="latent-rgb"), limits)
        t_bare = timed(lambda: bare_run(cache, bare_req, source), repeats, cuda)
        variants = [(f"{label}: bare diffusers (SDPA)", t_bare)]
        for preview in ("latent-rgb", "tiny-vae"):
            req = validate_request(dict(base, preview=preview), limits)
            variants.append((f"{label}: app, {preview} every step",
                             timed(lambda req=req: list(generate(req, cache, source=source)), repeats, cuda)))
        for variant, seconds in variants:
            rows.append({"variant": variant, "side": side, "steps": steps, "seconds": seconds,
                         "ms_per_step": 1000 * seconds / steps, "ratio": seconds / t_bare})
            if on_row is not None:
                on_row(rows[-1])
        cache = None  # let this family's weights go before the next one loads
        if cuda:
            torch.cuda.empty_cache()
    scale = "full size" if full else "tiny configs (proves the code runs, not GPU speed)"
    return {"device": name, "full": full, "rows": rows, "note": f"{name}; {scale}; median of {repeats}"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny configs at 64x64, 2 steps: a smoke test, on CPU too")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results-gpu-families.json", help="where to write ('' = nowhere)")
    args = p.parse_args(argv)
    result = gpu_families_section(full=False if args.tiny else None, repeats=args.repeats,
                                  on_row=lambda r: print(f"  {r['variant']:<44} {r['side']}px {r['steps']:>2} steps "
                                                         f"{r['seconds']:8.3f} s  {r['ms_per_step']:8.1f} ms/step  "
                                                         f"x{r['ratio']:.3f}"))
    print(f"  ({result['note']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
