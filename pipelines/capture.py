"""Capture inside the denoiser: the guidance pair and where each prompt token looks.

Both go through diffusers' and torch's own hooks on the run's denoiser (`unet` or
`transformer`), installed for one run while it holds the cache's `run_lock` and
removed when it ends:
- `GuidancePair`: a forward hook on the denoiser keeps its output under classifier-free
  guidance, the batch [uncond, text] that every diffusers pipeline chunks in that order
  (`noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)`).
- `AttentionRecorder`: attention processors (`set_attn_processor`) that wrap the model's
  own and also compute the softmax of the cross-attention scores of the text half. The
  wrapped processor still computes the layer's output, so capture never changes what the
  pipeline computes (same seed, same pixels); the scores cost one more query and key
  projection per cross-attention layer.

Cross-attention maps follow DAAM (Tang et al., 2022, "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention"): probabilities averaged over heads and layers, each
layer's map upsampled (bilinear) to the latent grid.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .anatomy import token_text


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's noise predictor: `unet` (SD 1.x/2.x, SDXL) or `transformer` (SD 3, Flux)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


class GuidancePair:
    """The denoiser's conditional and unconditional predictions of the latest call, each
    (1, C, h, w), in the denoiser's dtype; None without guidance, when the denoiser's batch
    is one (guidance_scale <= 1; Flux, whose guidance is distilled into one call)."""

    def __init__(self):
        self.noise_pred_uncond: torch.Tensor | None = None
        self.noise_pred_text: torch.Tensor | None = None

    @contextlib.contextmanager
    def hooked(self, module: torch.nn.Module):
        def keep(_module, _args, output):
            pair = output[0].detach()
            self.noise_pred_uncond, self.noise_pred_text = pair.chunk(2) if len(pair) == 2 else (None, None)

        handle = module.register_forward_hook(keep)
        try:
            yield self
        finally:
            handle.remove()


def cross_attention_probs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T * scale) of one diffusers `Attention` cross-attention layer, as its processor
    would compute it: (B, heads, HW, text tokens), float32, each row summing to 1 over the text."""
    if hidden_states.ndim == 4:  # (B, C, H, W) input of a UNet attention block
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
    batch = query.shape[0]
    query = query.view(batch, -1, attn.heads, query.shape[-1] // attn.heads).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2)
    if attn.norm_q is not None:
        query, key = attn.norm_q(query), attn.norm_k(key)
    scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
    return scores.softmax(dim=-1)


class AttentionRecorder:
    """Per-token cross-attention maps of one run, one (T, h, w) map per denoiser call.

    `positions` are the text positions of the prompt's tokens (for CLIP 1..n: the start
    and end markers and padding are left out). Only the prompt's row of the batch is read:
    the second of two under classifier-free guidance ([uncond, text]), else the only one.
    `take()` returns the maps of the denoiser call since the last `take()`: each layer's
    probabilities at `positions`, averaged over heads, upsampled to the (h, w) latent grid,
    then averaged over layers; float32 on the device, each value in [0, 1] and the T values
    of a pixel summing to at most 1.
    """

    def __init__(self, positions: list[int], grid: tuple[int, int]):
        self.positions, self.grid = positions, grid
        self._sum: torch.Tensor | None = None
        self._layers = 0

    def add(self, probs: torch.Tensor) -> None:
        """One layer's (B, heads, HW, text tokens) probabilities."""
        maps = probs[-1].mean(0)[:, self.positions]  # the prompt's row, (HW, T)
        h, w = self.grid
        factor = math.sqrt(h * w / maps.shape[0])  # the layer's downsampling
        layer_h = math.ceil(h / factor)
        maps = maps.T.reshape(1, len(self.positions), layer_h, maps.shape[0] // layer_h)
        maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)[0]
        self._sum = maps if self._sum is None else self._sum + maps
        self._layers += 1

    def take(self) -> torch.Tensor | None:
        if self._sum is None:
            return None
        maps, self._sum, self._layers = self._sum / self._layers, None, 0
        return maps

    @contextlib.contextmanager
    def hooked(self, module: torch.nn.Module):
        """Wrap every cross-attention processor of `module` for the block; the originals are put back."""
        originals = module.attn_processors
        cross = {name for name in originals if module.get_submodule(name.removesuffix(".processor")).is_cross_attention}
        module.set_attn_processor({name: _Recording(proc, self) if name in cross else proc
                                   for name, proc in originals.items()})
        try:
            yield self
        finally:
            module.set_attn_processor(originals)


class _Recording:
    """An attention processor that hands the layer's text probabilities to a recorder, then
    lets the model's own processor compute the layer."""

    def __init__(self, processor, recorder: AttentionRecorder):
        self.processor, self.recorder = processor, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            with torch.no_grad():
                self.recorder.add(cross_attention_probs(attn, hidden_states, encoder_hidden_states))
        return self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def prompt_tokens(pipe, family, prompt: str) -> tuple[list[int], tuple[str, ...]]:
    """The text positions of `prompt`'s own tokens in the sequence the denoiser attends to, and
    each token's text: the tokenizer `Family.attention_text` names, truncated as the pipeline
    truncates it, start and end markers and padding left out."""
    name, offset = family.attention_text
    tokenizer = getattr(pipe, name)
    limit = min(family.text_tokens.get(name, tokenizer.model_max_length), tokenizer.model_max_length)
    ids = tokenizer(prompt, truncation=True, max_length=limit).input_ids
    special = set(tokenizer.all_special_ids)
    kept = [(n, i) for n, i in enumerate(ids) if i not in special]
    return [offset + n for n, _ in kept], tuple(token_text(tokenizer.convert_ids_to_tokens(i)) for _, i in kept)

