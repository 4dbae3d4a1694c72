"""Capture inside the denoiser for every family: the guidance pair and the per-token attention maps
(pipelines/capture.py), on the tiny random-weight pipelines (pipelines/tiny.py) on CPU."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusionPipeline

from pipelines.capture import AttentionRecorder, cross_attention_probs, denoiser, joint_attention_probs, prompt_tokens
from pipelines.families import family_named

from .conftest import pixels
from .test_families import BARE, bare, run, settings
from .test_generate import bare_call, bare_pipeline

FAMILIES = ("sd", "sdxl", "sd3", "flux")
STEPS = 3
PROMPT = "a red cat"
# the tiny tokenizers read one character a token: CLIP marks a word's end (dropped), T5 a word's start ("▁" alone)
CLIP_TOKENS = ("a", "r", "e", "d", "c", "a", "t")
T5_TOKENS = ("▁", "a", "▁", "r", "e", "d", "▁", "c", "a", "t")
TOKENS = {"sd": CLIP_TOKENS, "sdxl": CLIP_TOKENS, "sd3": T5_TOKENS, "flux": T5_TOKENS}


def capture_settings(family: str, **extra) -> dict:
    return settings(family, **{"prompt": PROMPT, "steps": STEPS, **extra})


def bare_image(family: str, folder, req):
    """The plain diffusers pipeline's image for `req` (SD: test_generate's, the others: test_families')."""
    if family == "sd":
        return bare_call(req, bare_pipeline(req.mode, folder, req.scheduler))
    return bare(family, folder, req)


@pytest.mark.parametrize("family", FAMILIES)
def test_recording_attention_leaves_the_image_the_bare_pipelines(cache, tiny_families, family):
    folder = tiny_families(family)
    _, plain = run(cache, folder, capture_settings(family))
    model = denoiser(cache.pipeline("txt2img", str(folder)))
    own = model.attn_processors
    frames, recorded = run(cache, folder, capture_settings(family, record_attention=True))
    assert all(f.attention is not None for f in frames)  # it did record
    assert np.array_equal(pixels(recorded.image), pixels(plain.image))
    assert np.array_equal(pixels(recorded.image), pixels(bare_image(family, folder, recorded.request)))
    assert model.attn_processors == own  # the model's own processors are back


def test_recording_attention_leaves_img2img_the_bare_pipelines(cache, tiny_families):
    folder = tiny_families("sd")
    frames, final = run(cache, folder, capture_settings("sd", mode="img2img", steps=4, record_attention=True))
    assert len(frames) == 3 and all(f.attention is not None for f in frames)
    assert np.array_equal(pixels(final.image), pixels(bare_image("sd", folder, final.request)))


def test_flux_depth_records_its_t5_tokens_and_keeps_its_image(cache, tiny_families):
    # FLUX.1-Depth-dev's layout: the same transformer, the depth picture's latents beside the packed latents
    folder = tiny_families("flux-depth")
    raw = capture_settings("flux", mode="img2img", steps=4, guidance_scale=10.0,
                           depth_map=np.tile(np.linspace(0.0, 10.0, 64, dtype=np.float32), (64, 1)))
    raw["mode"] = "depth2img"
    _, plain = run(cache, folder, raw)
    frames, recorded = run(cache, folder, {**raw, "record_attention": True})
    assert np.array_equal(pixels(recorded.image), pixels(plain.image))
    assert [f.tokens for f in frames] == [T5_TOKENS] * 3
    assert {tuple(f.attention.tensor().shape) for f in frames} == {(len(T5_TOKENS), 32, 32)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_frame_maps_each_prompt_token_on_the_latent_grid(cache, tiny_families, family):
    # 64 x 32 px: a 32 wide, 16 high latent grid (the tiny VAEs downscale 2x), so rows and columns cannot swap
    frames, final = run(cache, tiny_families(family),
                        capture_settings(family, width=64, height=32, record_attention=True))
    assert len(frames) == STEPS
    for frame in frames:
        maps = frame.attention.tensor()
        assert frame.tokens == TOKENS[family]
        assert maps.shape == (len(TOKENS[family]), 16, 32) and maps.dtype == torch.float16
        assert maps.min() >= 0
        assert maps.float().sum(0).max() <= 1 + 1e-3  # fp16 rounds each value by at most 2^-11 of it
        assert maps.float().std() > 0  # a real map, not a constant
    assert not torch.equal(frames[0].attention.tensor(), frames[-1].attention.tensor())  # each step its own


def test_long_prompts_map_as_far_as_the_pipeline_reads(cache, tiny_families):
    long_prompt = "a" * 300  # 300 tokens in each tiny tokenizer
    sd = cache.pipeline("txt2img", str(tiny_families("sd")))
    positions, tokens = prompt_tokens(sd, family_named("sd"), long_prompt)
    assert positions == list(range(1, 76)) and len(tokens) == 75  # CLIP: 77 with its start and end markers
    sd3 = cache.pipeline("txt2img", str(tiny_families("sd3")))
    positions, tokens = prompt_tokens(sd3, family_named("sd3"), long_prompt)
    # T5's 256 (its end marker included) after CLIP's 77 positions in SD 3's text sequence
    assert positions == list(range(77, 77 + 255)) and len(tokens) == 255


def layer_inputs(pipe, layers: dict[str, torch.nn.Module]) -> dict[str, tuple[dict, object]]:
    """Each named attention layer's arguments (by name) and output in the first denoiser call of one step."""
    seen = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            if name not in seen:
                seen[name] = (inspect.signature(module.forward).bind(*args, **kwargs).arguments, output)
        return hook

    handles = [layer.register_forward_hook(keep(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        pipe(prompt=PROMPT, num_inference_steps=1, width=64, height=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, heads * head_dim) -> (B, heads, S, head_dim)"""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def test_unet_cross_attention_probs_are_the_layers_own(tiny_families):
    """The probabilities times the layer's values give the layer's output: they are the ones the model used."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_families("sd"))
    pipe.set_progress_bar_config(disable=True)
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    (args, output), = layer_inputs(pipe, {"attn2": attn}).values()
    hidden, text = args["hidden_states"], args["encoder_hidden_states"]
    with torch.no_grad():
        probs = cross_attention_probs(attn, hidden, text)
        assert probs.shape == (2, attn.heads, hidden.shape[1], 77)  # [uncond, text] rows; CLIP's 77 keys
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        values = heads(attn.to_v(text), attn.to_v.out_features // attn.heads)
        assert torch.allclose(attn.to_out[0]((probs @ values).transpose(1, 2).flatten(2)), output, atol=1e-5)
        # all 77 text positions: every pixel's probabilities sum to 1, on the latent grid
        recorder = AttentionRecorder(list(range(77)), (32, 32))
        recorder.add(probs)
    assert torch.allclose(recorder.take().sum(0), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_probs_are_the_layers_own_over_all_keys(tiny_families, family):
    """For each kind of joint-attention layer (SD 3; Flux's double- and single-stream blocks): the image
    queries' probabilities sum to 1 over ALL keys, and times the layer's values give the layer's output
    for the image tokens. Their text columns sum to less than 1 per pixel."""
    pipe = BARE[family][0].from_pretrained(tiny_families(family))
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    if family == "sd3":  # the first block and the last (context_pre_only: no text output, but text keys)
        layers = {"first": model.transformer_blocks[0].attn, "last": model.transformer_blocks[-1].attn}
    else:
        layers = {"double": model.transformer_blocks[0].attn, "single": model.single_transformer_blocks[0].attn}
    seen = layer_inputs(pipe, layers)
    text_tokens = seen["first" if family == "sd3" else "double"][0]["encoder_hidden_states"].shape[1]
    assert text_tokens == (77 + 256 if family == "sd3" else 512)
    for name, attn in layers.items():
        args, output = seen[name]
        hidden, text = args["hidden_states"], args.get("encoder_hidden_states")
        rope = args.get("image_rotary_emb")
        with torch.no_grad():
            probs = joint_attention_probs(attn, hidden, text, rope, text_tokens=text_tokens)
            image_tokens = 16 * 16  # 32 x 32 latents in 2 x 2 patches
            assert probs.shape == (2 if family == "sd3" else 1, attn.heads, image_tokens, image_tokens + text_tokens)
            assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
            if family == "sd3":  # keys [image, text]
                head_dim = attn.to_k.out_features // attn.heads
                values = torch.cat([heads(attn.to_v(hidden), head_dim), heads(attn.add_v_proj(text), head_dim)], 2)
                image_out, expected = attn.to_out[0]((probs @ values).transpose(1, 2).flatten(2)), output[0]
            elif text is not None:  # Flux double-stream: keys [text, image]
                values = torch.cat([heads(attn.add_v_proj(text), attn.head_dim), heads(attn.to_v(hidden), attn.head_dim)], 2)
                image_out, expected = attn.to_out[0]((probs @ values).transpose(1, 2).flatten(2)), output[0]
            else:  # Flux single-stream: one [text, image] sequence in, its attention out (no output projection)
                values = heads(attn.to_v(hidden), attn.head_dim)
                image_out, expected = (probs @ values).transpose(1, 2).flatten(2), output[:, text_tokens:]
            assert torch.allclose(image_out, expected, atol=1e-5)
            text_part = joint_attention_probs(attn, hidden, text, rope, text_tokens=text_tokens, text_only=True)
            columns = slice(image_tokens, None) if family == "sd3" else slice(0, text_tokens)
            assert torch.equal(text_part, probs[..., columns])
            recorder = AttentionRecorder(list(range(text_tokens)), (32, 32))
            recorder.add(text_part)
        per_pixel = recorder.take().sum(0)
        assert per_pixel.max() < 1 and per_pixel.min() > 0


def test_sd35_layers_qk_norm_and_image_only_attention():
    """SD 3.5's layout (pipelines/tiny.py has SD 3's): RMS-normed queries and keys, and in the first blocks a
    second attention over the image alone (attn2), which holds no text and is left to its own processor. The
    joint layer's probabilities are still the layer's own, and recording leaves the output bitwise."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                  joint_attention_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                                  qk_norm="rms_norm", dual_attention_layers=(0,))
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 5, 16),
                  pooled_projections=torch.randn(2, 16), timestep=torch.tensor([500, 500]), return_dict=False)
    attn = model.transformer_blocks[0].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out), with_kwargs=True)
    with torch.no_grad():
        plain = model(**inputs)[0]
        handle.remove()
        recorder = AttentionRecorder(list(range(5)), (16, 16))
        with recorder.hooked(model):
            assert type(model.transformer_blocks[0].attn2.processor).__name__ == "JointAttnProcessor2_0"
            recorded = model(**inputs)[0]
        assert recorder._layers == 2  # each block's joint attention, not attn2
        hidden, text = seen["kw"]["hidden_states"], seen["kw"]["encoder_hidden_states"]
        probs = joint_attention_probs(attn, hidden, text)
        values = torch.cat([heads(attn.to_v(hidden), 8), heads(attn.add_v_proj(text), 8)], 2)
        image_out = attn.to_out[0]((probs @ values).transpose(1, 2).flatten(2))
    assert torch.equal(recorded, plain)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(image_out, seen["out"][0], atol=1e-5)


def test_packed_tokens_land_on_the_unpacked_latent_grid():
    """A layer over Flux's packed tokens (h/2 x w/2, in the order of Flux's own position ids) maps onto the
    (h, w) latents: all of one token's probability at packed row 1, column 3 of a 2 x 4 grid lights the
    bottom-right 2 x 2 latents of a 4 x 8 grid most (bilinear upsampling spreads it half a token)."""
    ids = FluxPipeline._prepare_latent_image_ids(1, 2, 4, torch.device("cpu"), torch.float32)  # (8, 3): _, row, col
    probs = torch.zeros(1, 2, len(ids), 5)  # (B, heads, image tokens, text tokens)
    probs[0, :, (ids[:, 1] == 1) & (ids[:, 2] == 3), 4] = 1.0
    recorder = AttentionRecorder([4], (4, 8))
    recorder.add(probs)
    hot = recorder.take()[0]
    assert hot.shape == (4, 8)
    assert hot[2:, 6:].min() > 0.5 and hot.max() == hot[2:, 6:].max()
    assert hot[0].max() == 0 and hot[:, :5].max() == 0


@pytest.mark.parametrize("family,guidance", [("sd", 7.5), ("sdxl", 5.0), ("sd3", 7.0), ("sd", 1.0), ("flux", 3.5)])
def test_the_guidance_pair_makes_the_noise_pred_the_scheduler_got(cache, tiny_families, family, guidance):
    """uncond + g (text - uncond) is the scheduler's noise_pred, bitwise: every guided pipeline computes it in
    this order in the denoiser's dtype. Without guidance (guidance_scale <= 1, and Flux, whose guidance is an
    input of the model) there is no pair."""
    frames, _ = run(cache, tiny_families(family), capture_settings(family, guidance_scale=guidance))
    assert len(frames) == STEPS
    for frame in frames:
        noise_pred = frame.noise_pred.tensor()
        if family == "flux" or guidance <= 1:
            assert frame.noise_pred_text is None and frame.noise_pred_uncond is None
            continue
        text, uncond = frame.noise_pred_text.tensor(), frame.noise_pred_uncond.tensor()
        assert text.shape == uncond.shape == noise_pred.shape and noise_pred.shape[0] == 1
        assert torch.equal(uncond + guidance * (text - uncond), noise_pred)
        assert not torch.equal(text, uncond)
