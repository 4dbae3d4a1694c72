"""Model configurations of the micro Stable Diffusion (same classes as SD 1.5 / SD 2-depth)."""
from __future__ import annotations

import torch

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

RES = 128
LATENT = 16  # SD's 8x latent factor
TEXT_DIM = 64
MAX_TOKENS = 32
TOKEN_EMBED_SCALE = 8.0

SCHED_KW = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
)


VAE_CHANNELS = (16, 32, 64, 64)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        # four levels, three 2x downsamples: SD's 8x latent factor
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        # 4 groups: 4 channels per group at the 16-channel level. One channel per group is instance norm,
        # which takes away the flat background's colour, and the decoder drew it wrong away from the shapes
        block_out_channels=VAE_CHANNELS, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=RES, scaling_factor=1.0, mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    te = CLIPTextModel(cfg)
    # CLIP's init gives token embeddings std 0.02 against attention outputs of std ~1, so a frozen random
    # encoder's output for a word was mostly the average of the words before it: "red" and "circle" got
    # nearly one attention map. Scaled 8x, a word keeps its identity (cos 0.78 between "red" in two
    # captions, against -0.14) and still carries some context (training/NOTES.md, session 8).
    with torch.no_grad():
        te.get_input_embeddings().weight.mul_(TOKEN_EMBED_SCALE)
    return te


UNET_CHANNELS = (32, 64, 64)


def make_unet(in_channels: int = 4, channels: tuple[int, ...] = UNET_CHANNELS) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=in_channels, out_channels=4,
        # three levels (16, 8, 4 px) with cross-attention at each: the 4x4 level sees the whole layout
        # ("on the left"); a fourth level at 2x2 learned position but never shape (training/NOTES.md)
        down_block_types=("CrossAttnDownBlock2D",) * len(channels), up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=TEXT_DIM,
        # diffusers reads `attention_head_dim` here as the number of heads. Two heads (dim 16 / 32): at 8
        # (dim 4 / 8) CPU attention was half of a training step and a step took twice as long
        attention_head_dim=2, norm_num_groups=16,
    )


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHED_KW)


def make_inference_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHED_KW, set_alpha_to_one=False, steps_offset=1)


def make_dpt() -> tuple[DPTForDepthEstimation, DPTImageProcessor]:
    cfg = DPTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=RES,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
        reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=32, head_in_index=-1, is_hybrid=False,
        readout_type="project", add_projection=False,
    )
    proc = DPTImageProcessor(
        do_resize=True, size={"height": RES, "width": RES}, keep_aspect_ratio=False, ensure_multiple_of=1,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], do_pad=False,
    )
    return DPTForDepthEstimation(cfg), proc
