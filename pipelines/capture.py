"""Capture inside the denoiser: the guidance pair and where each prompt token looks.

Both go through diffusers' and torch's own hooks on the run's denoiser (`unet` or
`transformer`), installed for one run while it holds the cache's `run_lock` and
removed when it ends:
- `GuidancePair`: a forward hook on the denoiser keeps its output under classifier-free
  guidance, the batch [uncond, text] that every diffusers pipeline chunks in that order
  (`noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)`).
- `AttentionRecorder`: attention processors (`set_attn_processor`) that wrap the model's
  own and also compute the softmax of the attention scores of the prompt's row. The
  wrapped processor still computes the layer's output, so capture never changes what the
  pipeline computes (same seed, same pixels); the scores cost one more query and key
  projection per recorded layer.

Cross-attention maps follow DAAM (Tang et al., 2022, "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention"): probabilities averaged over heads and layers, each
layer's map upsampled (bilinear) to the latent grid. UNets (SD, SDXL) have cross-attention
layers whose keys are the text alone; SD 3 (MMDiT) and Flux have joint attention over image
and text tokens together, of which the image queries' text columns are kept.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, _get_qkv_projections

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
            noise_pred = output[0].detach()
            guided = noise_pred.shape[0] == 2  # runs make one image: a batch of two is [uncond, text]
            self.noise_pred_uncond, self.noise_pred_text = noise_pred.chunk(2) if guided else (None, None)

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


def joint_attention_probs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                          image_rotary_emb=None, text_tokens: int | None = None,
                          text_only: bool = False) -> torch.Tensor:
    """The image tokens' rows of one joint-attention layer (image and text tokens attend to each
    other in one softmax), as its processor computes them: softmax(Q K^T / sqrt(head_dim)) (SDPA's
    default scale) of the image queries over ALL keys, image and text.

    SD 3 (`JointAttnProcessor2_0`, an `Attention` with added key/value projections): keys
    [image, text], the text being `encoder_hidden_states`. Flux (`FluxAttnProcessor`): keys
    [text, image], RoPE (`image_rotary_emb`) on queries and keys; a double-stream block gets
    the text as `encoder_hidden_states`, a single-stream block gets [text, image] as one
    `hidden_states` and `text_tokens` says how long its text part is. Projections and norms are
    the layer's own; for Flux diffusers' `_get_qkv_projections` (which projects the values too,
    unused here) and `apply_rotary_emb`, as its processor calls them.

    Returns (B, heads, image tokens, keys) float32 in the model's key order, each row summing to
    1; with `text_only` the text keys' columns alone, (B, heads, image tokens, text tokens), each
    row summing to at most 1. Computed one head at a time, so the transient scores are one
    head's (B, image tokens, all tokens) float32.
    """
    if isinstance(attn, FluxAttention):
        query, key, _, text_query, text_key, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, S, heads, head_dim)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key = query.transpose(1, 2)[:, :, text_tokens:], key.transpose(1, 2)  # (B, heads, S, head_dim)
        text = slice(0, text_tokens)
    else:
        batch, image_tokens = hidden_states.shape[:2]
        query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
        text_key = attn.add_k_proj(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, text_key = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, text_key))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        key = torch.cat([key, text_key], dim=2)
        text = slice(image_tokens, None)
    scale = query.shape[-1] ** -0.5
    columns = text if text_only else slice(None)
    return torch.stack([(q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)[..., columns]
                        for q, k in zip(query.unbind(1), key.unbind(1))], dim=1)


class AttentionRecorder:
    """Per-token attention maps of one run, one (T, h, w) map per denoiser call.

    `positions` are the prompt's tokens' positions in the text sequence the denoiser attends
    to (for CLIP 1..n: the start and end markers and padding are left out; `prompt_tokens`).
    Only the prompt's row of the batch is read: the second of two under classifier-free
    guidance ([uncond, text]), else the only one. What a layer gives depends on its kind:
    - UNet cross-attention (SD, SDXL): the keys are the text alone, so a pixel's
      probabilities over all text positions (markers and padding included) sum to 1.
    - joint attention (SD 3, both Flux block kinds; `joint_attention_probs`): the keys are
      image and text tokens in one softmax, as the model takes it, of which the text columns
      are kept: a pixel's probabilities over the text sum to at most 1, the rest being its
      attention to image tokens.
    `take()` returns the maps of the denoiser call since the last `take()` (or `take_sum()`): each layer's
    probabilities at `positions`, averaged over heads, upsampled (bilinear) from the layer's
    grid (UNet: its resolution; SD 3 patches and Flux's packed tokens: h/2 x w/2) to the
    (h, w) latent grid, then averaged over layers; float32 on the device, each value in
    [0, 1] and the T values of a pixel summing to at most 1.
    """

    def __init__(self, positions: list[int], grid: tuple[int, int]):
        self.positions, self.grid = positions, grid
        self._sum: torch.Tensor | None = None
        self._layers = 0
        self._text_tokens: int | None = None  # Flux: the text's length, as the latest double-stream block saw it

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
        taken = self.take_sum()
        return None if taken is None else taken[0] / taken[1]

    def take_sum(self) -> tuple[torch.Tensor, int] | None:
        """What `take` divides: the sum of the layers' maps and how many layers it holds, handed over
        as they are (the step callback's share; the division runs on the decode thread)."""
        if self._sum is None:
            return None
        taken, self._sum, self._layers = (self._sum, self._layers), None, 0
        return taken

    @contextlib.contextmanager
    def hooked(self, module: torch.nn.Module):
        """Wrap, for the block, the processor of every attention layer of `module` whose keys hold
        the text (its kind decides the wrapper); the originals are put back."""
        originals = module.attn_processors
        module.set_attn_processor({name: _recording(module.get_submodule(name.removesuffix(".processor")), proc, self)
                                   for name, proc in originals.items()})
        try:
            yield self
        finally:
            module.set_attn_processor(originals)


def _recording(attn, processor, recorder: AttentionRecorder):
    """The processor that records one layer, by the layer's kind; its own where its keys hold no text."""
    if isinstance(attn, FluxAttention):
        # both block kinds: Flux.1 has 19 double-stream and 38 single-stream blocks, and the
        # single-stream ones attend over the same [text, image] sequence in one softmax, so
        # leaving them out would drop two thirds of where the text meets the image
        return _JointRecording(processor, recorder)
    if attn.added_kv_proj_dim is not None:  # SD 3's joint attention (MMDiT)
        return _JointRecording(processor, recorder)
    if attn.is_cross_attention:  # a UNet's attn2
        return _Recording(processor, recorder)
    return processor  # self-attention over the image alone: a UNet's attn1, SD 3.5's attn2


class _Recording:
    """An attention processor that hands the layer's text probabilities to a recorder, then
    lets the model's own processor compute the layer."""

    def __init__(self, processor, recorder: AttentionRecorder):
        self.processor, self.recorder = processor, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            with torch.no_grad():  # the prompt's row only: the whole batch would double the cost under guidance
                self.recorder.add(cross_attention_probs(attn, hidden_states[-1:], encoder_hidden_states[-1:]))
        return self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class _JointRecording(_Recording):
    """`_Recording` for a joint-attention layer (SD 3, Flux): the image queries' text columns of
    the prompt's row only (`joint_attention_probs` over the whole batch would double its cost
    under guidance)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        # Flux's attention passes (attention_mask, image_rotary_emb) positionally; SD 3 has no RoPE
        rope = args[1] if len(args) > 1 else kwargs.get("image_rotary_emb")
        if encoder_hidden_states is not None:
            # Flux runs every double-stream block before the single-stream ones (FluxTransformer2DModel.forward),
            # whose [text, image] sequence starts with this many text tokens
            self.recorder._text_tokens = encoder_hidden_states.shape[1]
        with torch.no_grad():
            self.recorder.add(joint_attention_probs(
                attn, hidden_states[-1:], encoder_hidden_states[-1:] if encoder_hidden_states is not None else None,
                rope, text_tokens=self.recorder._text_tokens, text_only=True))
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

