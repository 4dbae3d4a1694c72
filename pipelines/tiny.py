"""Tiny random-weight Stable Diffusion checkpoints, built from configs.

Used by the tests and as the app's default model until the bundled micro model
exists. The folder layout is the one `models/micro` uses (pipelines/layout.py),
here with a `tiny_vae/` and the UNTRAINED marker.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

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
    depth_estimator = DPTForDepthEstimation(
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
    return {
        "unet": tiny_unet(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "depth_unet": tiny_unet(in_channels=5),
        "depth_estimator": depth_estimator,
        "feature_extractor": DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False),
        # same 2x upsampling as the VAE above, for the tiny-vae preview
        "tiny_vae": AutoencoderTiny(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
            latent_channels=4,
        ),
    }


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
