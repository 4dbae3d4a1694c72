"""Tiny random-weight Stable Diffusion checkpoints, built from configs.

Used by the tests and as the app's default model until the bundled micro model
exists. The folder layout is the one `models/micro` uses (pipelines/layout.py),
here with a `tiny_vae/` and the UNTRAINED marker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from . import layout


def tiny_tokenizer() -> CLIPTokenizer:
    # Byte-level alphabet only (CLIP's layout: each byte, then each byte ending a word):
    # any prompt tokenizes, one token per character.
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_unet(in_channels: int = 4, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_components(seed: int = 0) -> dict:
    """Every component of a tiny txt2img + depth checkpoint, random weights from `seed`."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    depth_estimator = tiny_depth_estimator()
    return {
        "unet": tiny_unet(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "depth_unet": tiny_unet(in_channels=5),
        "depth_estimator": depth_estimator,
        "feature_extractor": tiny_depth_processor(),
        # same 2x upsampling as the VAE above, for the tiny-vae preview
        "tiny_vae": AutoencoderTiny(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
            latent_channels=4,
        ),
    }


def tiny_depth_estimator() -> DPTForDepthEstimation:
    """A tiny DPT (random weights from torch's current seed) reading 32x32 inputs."""
    return DPTForDepthEstimation(
        DPTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            backbone_out_indices=(0, 1, 2, 3),
            neck_hidden_sizes=(8, 16, 32, 32),
            fusion_hidden_size=16,
            head_in_index=-1,
            is_hybrid=False,
        )
    )


def tiny_depth_processor() -> DPTImageProcessor:
    return DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)


def save_tiny_depth_estimator(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny DPT and its processor (what `--depth-estimator` loads) to `folder`."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tiny_depth_estimator().save_pretrained(folder)
    tiny_depth_processor().save_pretrained(folder)
    return folder


def save_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint in the bundled layout and mark it untrained."""
    folder = Path(folder)
    parts = tiny_components(seed)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    layout.save_depth(folder, parts["depth_unet"], parts["depth_estimator"], parts["feature_extractor"])
    layout.save_tiny_vae(folder, parts["tiny_vae"])
    layout.mark_untrained(folder)
    return folder


# --- Other model families ---------------------------------------------------------------------------------------
# Modelled on diffusers' own `get_dummy_components` (tests/pipelines/{stable_diffusion_xl,stable_diffusion_3,flux}),
# with tokenizers built here instead of downloaded. Every VAE has 2 blocks (2x downsampling, like the SD one) and
# every family's native side is 64 px where the pipeline reads it from a config (Flux's pipeline does not: it
# defaults to 128 latent pixels, so 256 px here; always pass width/height).

TEXT_WIDTH = 32  # hidden size of every tiny text encoder


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, Metaspace like T5's sentencepiece) over the byte-level alphabet plus "▁".

    Ids: <pad>=0, </s>=1, <unk>=2 as in T5; a character outside the alphabet becomes <unk>, as in T5.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in sorted(ByteLevel.alphabet()) if c != "▁"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip(tokenizer: CLIPTokenizer, with_projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _t5(tokenizer: T5TokenizerFast, width: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None, **kw) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **kw,
    )


def _tiny_vae(latent_channels: int) -> AutoencoderTiny:
    # same 2x scale as `_vae`
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=latent_channels,
    )


def tiny_sdxl(seed: int = 0) -> tuple[StableDiffusionXLPipeline, AutoencoderTiny]:
    """SDXL layout: CLIP-L-like + CLIP-G-like (with projection) encoders, whose hidden states are concatenated
    (cross_attention_dim 2 * TEXT_WIDTH) and whose pooled output + 6 size ids feed the "text_time" embedding.
    Scheduler and VAE constants from stabilityai/stable-diffusion-xl-base-1.0."""
    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH,
        cross_attention_dim=2 * TEXT_WIDTH,
        norm_num_groups=8,
    )
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(4, 0.13025, force_upcast=True),
        text_encoder=_clip(tokenizer),
        text_encoder_2=_clip(tokenizer_2, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    return pipe, _tiny_vae(4)


def tiny_sd3(seed: int = 0) -> tuple[StableDiffusion3Pipeline, AutoencoderTiny]:
    """SD3 layout: two CLIPs with projection (hidden states concatenated to 2 * TEXT_WIDTH, which is the T5 width
    and joint_attention_dim, so diffusers' zero-padding of the CLIP states is a no-op) + T5, 16-channel latents in
    2x2 patches. Scheduler and VAE constants from stabilityai/stable-diffusion-3-medium-diffusers."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,  # SD 3's last block reads no context and takes no ControlNet residual (context_pre_only)
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=2 * TEXT_WIDTH,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=64,  # up to 64 patches a side: 256 px
    )
    tokenizer, tokenizer_2, tokenizer_3 = tiny_tokenizer(), tiny_tokenizer(), tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, 1.5305, 0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, with_projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, 2 * TEXT_WIDTH),
        tokenizer_3=tokenizer_3,
    )
    return pipe, _tiny_vae(16)


def tiny_flux(seed: int = 0, control: bool = False) -> tuple[FluxPipeline, AutoencoderTiny]:
    """FLUX.1-dev layout: CLIP (pooled output) + T5 (hidden states), both TEXT_WIDTH wide; 16-channel latents
    packed in 2x2 patches (transformer in_channels 64); distilled guidance (guidance_embeds). Scheduler and VAE
    constants from black-forest-labs/FLUX.1-dev. `control`: FLUX.1-Depth-dev's layout, a FluxControlPipeline whose
    transformer reads the packed latents and the depth picture's packed latents side by side (in_channels 128)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=128 if control else 64,
        out_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
    pipe = (FluxControlPipeline if control else FluxPipeline)(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(16, 0.3611, 0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2, TEXT_WIDTH),
        tokenizer_2=tokenizer_2,
    )
    return pipe, _tiny_vae(16)


FAMILIES = ("sd", "sdxl", "sd3", "flux", "flux-depth")
_BUILDERS = {"sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux,
             "flux-depth": lambda seed: tiny_flux(seed, control=True)}


def tiny_controlnet(family: str, seed: int = 1) -> ControlNetModel | SD3ControlNetModel:
    """A depth ControlNet that fits the tiny `family` ("sd", "sdxl", "sd3") denoiser, random weights from `seed`.
    A real ControlNet starts with zero convolutions (no effect until trained); here those are random too, so that
    the control changes the image. Raises ValueError for another family."""
    if family in ("sd", "sdxl"):
        unet = tiny_unet() if family == "sd" else tiny_sdxl(seed)[0].unet
        torch.manual_seed(seed)
        # one stride-2 step in the conditioning embedding: the tiny VAEs downsample 2x, not 8x
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8),
                                          load_weights_from_unet=False)
    elif family == "sd3":
        torch.manual_seed(seed)
        model = SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                   num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH,
                                   caption_projection_dim=32, pooled_projection_dim=2 * TEXT_WIDTH, out_channels=16,
                                   pos_embed_max_size=64)
    else:
        raise ValueError(f"tiny ControlNets exist for sd, sdxl and sd3, not {family!r}")
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=1.0)
    return model


def save_tiny_controlnet(folder: str | Path, family: str, seed: int = 1) -> Path:
    """Write `tiny_controlnet(family, seed)` to `folder` (what `--controlnet` loads)."""
    folder = Path(folder)
    tiny_controlnet(family, seed).save_pretrained(folder)
    return folder


def save_tiny_family(folder: str | Path, family: str, seed: int = 0) -> Path:
    """Write a tiny random pipeline of `family` (one of FAMILIES) to `folder` and mark it untrained.

    "sd" is `save_tiny_checkpoint` (with depth parts); the others are plain `save_pretrained` folders of
    StableDiffusionXLPipeline / StableDiffusion3Pipeline / FluxPipeline / FluxControlPipeline ("flux-depth")
    plus `tiny_vae/`. The same seed gives
    the same weights. Raises ValueError for an unknown family.
    """
    if family == "sd":
        return save_tiny_checkpoint(folder, seed)
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    folder = Path(folder)
    pipe, tiny_vae = _BUILDERS[family](seed)
    pipe.save_pretrained(folder)
    layout.save_tiny_vae(folder, tiny_vae)
    layout.mark_untrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tiny", description="Write a tiny random pipeline.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_family(args.folder, args.family, args.seed))


if __name__ == "__main__":
    main()
