"""Write a diffusers Stable Diffusion folder as one checkpoint file in the original (LDM/CompVis)
layout, the reverse of diffusers' `from_single_file` conversion.

Vendored from diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` (Apache-2.0;
huggingface/diffusers, the script is not in the package), SD 1.x text encoder only. The script
hard-codes SD 1.5's shape (4 blocks, 2 resnets per down block); here the block counts, resnets per
block and where the attentions sit come from the UNet's and VAE's configs, so the tiny test models
convert too.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

UNET_MAP = [  # (LDM name, diffusers name)
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
UNET_MAP_RESNET = [
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"),
]
VAE_MAP_ATTN = [("norm.", "group_norm."), ("q.", "query."), ("k.", "key."), ("v.", "value."),
                ("proj_out.", "proj_attn.")]
VAE_EXTRA = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_layer_map(config) -> list[tuple[str, str]]:
    # the script's loop with SD 1.5's 4 blocks and 2 resnets made the config's
    n, per = len(config.block_out_channels), config.layers_per_block
    down_attn = ["CrossAttn" in t for t in config.down_block_types]
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    pairs = []
    for i in range(n):
        for j in range(per):
            pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):
            pairs.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                pairs.append((f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def convert_unet_state_dict(state: dict, config) -> dict:
    mapping = {k: k for k in state}
    for sd_name, hf_name in UNET_MAP:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in UNET_MAP_RESNET:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    layer_map = _unet_layer_map(config)
    for k, v in mapping.items():
        for sd_part, hf_part in layer_map:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {v: state[k] for k, v in mapping.items()}


def _vae_map(config) -> list[tuple[str, str]]:
    n, per = len(config.block_out_channels), config.layers_per_block
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(per)]
        if i < n - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        pairs += [(f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(per + 1)]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    return pairs


def convert_vae_state_dict(state: dict, config) -> dict:
    mapping = {k: k for k in state}
    vae_map = _vae_map(config)
    for k, v in mapping.items():
        for sd_part, hf_part in vae_map:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in VAE_MAP_ATTN:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    out = {v: state[k] for k, v in mapping.items()}
    # LDM's mid-block attention is 1x1 convolutions, named q, k, v, proj_out
    for k in list(out):
        for hf_name, sd_name in VAE_EXTRA:
            if f"mid.attn_1.{hf_name}." in k:
                w = out.pop(k)
                out[k.replace(hf_name, sd_name)] = w.reshape(*w.shape, 1, 1) if w.ndim == 2 else w
    return out


def save_original_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """Write the SD 1.x diffusers folder `folder` as one `.safetensors` file at `path`, keys as
    the original LDM checkpoints name them (`model.diffusion_model.`, `first_stage_model.`,
    `cond_stage_model.transformer.text_model.`)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    unet = convert_unet_state_dict(pipe.unet.state_dict(), pipe.unet.config)
    vae = convert_vae_state_dict(pipe.vae.state_dict(), pipe.vae.config)
    state = {
        **{"model.diffusion_model." + k: v for k, v in unet.items()},
        **{"first_stage_model." + k: v for k, v in vae.items()},
        # transformers 5 flattened CLIPTextModel's keys; the original files keep `text_model.`
        **{"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
           for k, v in pipe.text_encoder.state_dict().items()},
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
