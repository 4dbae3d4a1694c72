"""Full-size Stable Diffusion architectures with random weights, on a CUDA GPU.

Speed does not depend on weight values, so these time like the real SD 1.5 and
SD 2-depth checkpoints (configs: ../shared/reference/FACTS.md). Without CUDA the
same code runs at a reduced size (small channels, 64x64, 3 steps, fp32) to prove
it works; those figures say nothing about GPU speed.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines import ModelCache, generate, layout, validate_request
from pipelines.tiny import tiny_components, tiny_tokenizer

from .callback import timed_callback, wrapped_step_callbacks

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def sd_parts(depth: bool, full: bool) -> dict:
    """SD 1.5 (depth=False) or SD 2-depth (depth=True) components, random weights."""
    channels = (320, 640, 1280, 1280) if full else (32, 64, 64, 64)
    text_dim = 1024 if depth else 768
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, down_block_types=SD_DOWN, up_block_types=SD_UP,
        attention_head_dim=((5, 10, 20, 20) if depth else 8) if full else 4, cross_attention_dim=text_dim,
        use_linear_projection=depth, in_channels=5 if depth else 4, out_channels=4, sample_size=64,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512) if full else (32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, scaling_factor=0.18215,
        norm_num_groups=32, sample_size=512,
    )
    tokenizer = tiny_tokenizer()  # speed does not depend on the vocabulary; ids stay below vocab_size
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, num_hidden_layers=(23 if depth else 12) if full else 2,
        num_attention_heads=16 if depth else 12, intermediate_size=4096 if depth else 3072,
        hidden_act="gelu" if depth else "quick_gelu", max_position_embeddings=77,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    # TAESD's published layout (64 channels, 3 upsamplings) for the tiny-vae preview
    taesd = AutoencoderTiny(encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler, tiny_vae=taesd)


def save_checkpoint(folder: Path, depth: bool, full: bool) -> Path:
    parts = sd_parts(depth, full)
    tiny = tiny_components()
    # depth: the bundled layout, a txt2img folder + depth_unet + a small DPT (never run: depth maps are passed in)
    base_unet = UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": 4}) if depth else parts["unet"]
    StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                            unet=base_unet, scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    layout.save_tiny_vae(folder, parts["tiny_vae"])
    if depth:
        layout.save_depth(folder, parts["unet"], tiny["depth_estimator"], tiny["feature_extractor"])
    return folder


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_section(repeats: int = 3, on_row=None) -> dict:
    cuda = torch.cuda.is_available()
    full = cuda
    size, steps = (512, 50) if full else (64, 3)
    device_name = torch.cuda.get_device_name() if cuda else "cpu (reduced size: proves the code runs, not GPU speed)"
    rows = []

    def add(variant: str, seconds: float, ratio: float, callback: list[float] | None = None) -> None:
        rows.append({"variant": variant, "seconds": seconds, "ratio": ratio})
        if callback:  # the step callback's own host time per step on the denoising thread
            rows[-1]["callback_us_median"] = 1e6 * statistics.median(callback)
        if on_row is not None:
            on_row(rows[-1])

    for depth in (False, True):
        name = "SD 2-depth" if depth else "SD 1.5"
        folder = save_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", depth, full)
        cache = ModelCache(device="cuda" if cuda else "cpu")
        mode = "depth2img" if depth else "txt2img"
        base = dict(mode=mode, prompt="a photo of a cat", seed=1, steps=steps, guidance_scale=7.5, width=size,
                    height=size, scheduler="DDIM", strength=1.0)
        if depth:
            base["image"] = Image.new("RGB", (size, size), (120, 90, 60))
            depth_map = np.zeros((size, size), np.float32)
            depth_map[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
            base["depth_map"] = depth_map
        shared = cache.pipeline(mode, str(folder))

        def bare():
            req = validate_request(dict(base, preview="latent-rgb"))
            kwargs = dict(width=size, height=size) if not depth else dict(
                image=req.image, strength=1.0, depth_map=torch.from_numpy(req.depth_map)[None])
            shared(req.prompt, num_inference_steps=steps, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(1), **kwargs)

        def app(preview, callback: list[float]):
            req = validate_request(dict(base, preview=preview))

            def run():
                with wrapped_step_callbacks(timed_callback(callback)):
                    list(generate(req, cache, source=str(folder)))

            return run

        t_bare = timed(bare, repeats, cuda)
        add(f"{name}: bare diffusers (SDPA)", t_bare, 1.0)
        for preview in ("latent-rgb", "tiny-vae", "full-vae"):
            callback = []
            t = timed(app(preview, callback), repeats, cuda)
            add(f"{name}: app, {preview} every step", t, t / t_bare, callback)
        if cuda and importlib.util.find_spec("xformers") is not None:
            shared.enable_xformers_memory_efficient_attention()
            t = timed(bare, repeats, cuda)
            add(f"{name}: bare diffusers + xformers", t, t / t_bare)
            shared.disable_xformers_memory_efficient_attention()
        if cuda and not depth:
            compiled = ModelCache(device="cuda", compile_unet=True)
            req = validate_request(dict(base, preview="latent-rgb"))
            callback = []

            def run_compiled():
                with wrapped_step_callbacks(timed_callback(callback)):
                    list(generate(req, compiled, source=str(folder)))

            t = timed(run_compiled, repeats, cuda)
            add(f"{name}: app --compile, latent-rgb", t, t / t_bare, callback)
    return {"device": device_name, "size": size, "steps": steps, "rows": rows,
            "note": f"{device_name}; {size}x{size}, {steps} steps, guidance 7.5, median of {repeats}"}


if __name__ == "__main__":
    gpu_section(on_row=print)
