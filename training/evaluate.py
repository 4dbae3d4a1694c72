"""Automatic evaluation of the shipped micro model through the real diffusers pipelines.

    python -m training.evaluate --model models/micro --n 200

Prints a table, writes training/RESULTS.md and models/micro/contact_sheet.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines import layout
from pipelines.devices import app_cpu_threads, use_fastest_attention

from . import scenes as S
from .scorer import analyse, score  # noqa: F401  (re-exported for tests)

TARGETS = {"colour": 0.95, "background": 0.95, "shape": 0.85, "position": 0.85}


def load_settings(model: str) -> dict:
    return layout.read_card(model)


def load_txt2img(model: str, dtype=torch.float32):
    """Plain from_pretrained, with the attention processor the app sets (same maths, less overhead)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    use_fastest_attention(pipe, torch.device("cpu"))
    return pipe


def load_depth2img(model: str, pipe=None, dtype=torch.float32):
    """Exactly the app's contract: share VAE / text encoder / tokenizer / scheduler of the txt2img model."""
    from diffusers import StableDiffusionDepth2ImgPipeline, UNet2DConditionModel
    from transformers import DPTForDepthEstimation, DPTImageProcessor
    pipe = pipe or load_txt2img(model, dtype)
    d = StableDiffusionDepth2ImgPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=UNet2DConditionModel.from_pretrained(Path(model) / layout.DEPTH_UNET, dtype=dtype),
        scheduler=pipe.scheduler,
        depth_estimator=DPTForDepthEstimation.from_pretrained(Path(model) / layout.DEPTH_ESTIMATOR, dtype=dtype),
        feature_extractor=DPTImageProcessor.from_pretrained(Path(model) / layout.DEPTH_ESTIMATOR))
    d.set_progress_bar_config(disable=True)
    use_fastest_attention(d, torch.device("cpu"))
    return d


def generate(pipe, prompts, cfg, seeds, batch=20):
    out = []
    for i in range(0, len(prompts), batch):
        g = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        out += pipe(list(prompts[i:i + batch]), width=cfg["width"], height=cfg["height"],
                    num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"], generator=g).images
    return out


def _acc(rows):
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def eval_txt2img(pipe, cfg, n, seed):
    rng = np.random.default_rng([seed, 100])
    sc = [S.sample_scene(rng) for _ in range(n)]
    ims = generate(pipe, [S.canonical_caption(s) for s in sc], cfg, [seed * 10000 + i for i in range(n)])
    return _acc([score(im, s) for im, s in zip(ims, sc)]), ims, sc


def eval_variants(pipe, cfg, n, seed):
    """Word-order / case / partial captions: score only the attributes the caption names."""
    rng = np.random.default_rng([seed, 101])
    rows = []
    prompts, wants = [], []
    for i in range(n):
        s = S.sample_scene(rng)
        obj, pos, bgp = f"a {s['colour']} {s['shape']}", S.POSITION_PHRASE[s["position"]], f"{s['background']} background"
        kind = i % 5
        full = {k: s[k] for k in ("colour", "shape", "position", "background")}
        if kind == 0:
            p, w = f"{bgp}, {obj} {pos}".upper(), full
        elif kind == 1:
            p, w = f"{pos}, {obj}, {bgp}".title(), full
        elif kind == 2:
            p, w = obj, {"colour": s["colour"], "shape": s["shape"]}
        elif kind == 3:
            p, w = bgp, {"background": s["background"]}
        else:
            p, w = f"{obj} {pos}", {"colour": s["colour"], "shape": s["shape"], "position": s["position"]}
        prompts.append(p); wants.append(w)
    ims = generate(pipe, prompts, cfg, [seed * 20000 + i for i in range(n)])
    for im, w in zip(ims, wants):
        got = analyse(im)
        rows.append({k: got[k] == v for k, v in w.items()})
    return _acc(rows)


def eval_diversity(pipe, cfg, seed, n_prompts=10, n_seeds=4):
    rng = np.random.default_rng([seed, 102])
    sc = [S.sample_scene(rng) for _ in range(n_prompts)]
    prompts = [S.canonical_caption(s) for s in sc for _ in range(n_seeds)]
    ims = generate(pipe, prompts, cfg, [seed * 30000 + i for i in range(len(prompts))])
    cents = []
    for i in range(n_prompts):
        a = np.stack([np.asarray(im, np.float32) for im in ims[i * n_seeds:(i + 1) * n_seeds]])
        cents.append(float(np.abs(a - a.mean(0)).mean()))
    return float(np.mean(cents))


def eval_vae_psnr(pipe, n, seed):
    from .train import psnr, to_tensor
    _, imgs, _ = S.render_batch(n, np.random.default_rng([seed, 103]), 64)
    x = to_tensor(imgs).to(pipe.vae.dtype)
    with torch.no_grad():
        rec = torch.cat([pipe.vae.decode(pipe.vae.encode(x[i:i + 50]).latent_dist.mode()).sample for i in range(0, n, 50)])
    return psnr(rec.float(), x.float())


def eval_img2img(pipe, cfg, n, seed):
    from diffusers import StableDiffusionImg2ImgPipeline
    p = StableDiffusionImg2ImgPipeline(**pipe.components)
    p.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([seed, 104])
    keep, follow = [], []
    for i in range(n):
        s = S.sample_scene(rng)
        img, _ = S.render(s, cfg["width"])
        init = Image.fromarray(img)
        new_c = [c for c in S.COLOURS if c not in (s["colour"], s["background"])][rng.integers(6)]
        prompt = S.canonical_caption(dict(s, colour=new_c))
        kw = dict(num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"])
        a = p(prompt, image=init, strength=0.3, generator=torch.Generator().manual_seed(seed * 40000 + i), **kw).images[0]
        keep.append(analyse(a)["position"] == s["position"])
        b = p(prompt, image=init, strength=0.8, generator=torch.Generator().manual_seed(seed * 50000 + i), **kw).images[0]
        follow.append(analyse(b)["colour"] == new_c)
    return float(np.mean(keep)), float(np.mean(follow))


def eval_depth2img(dpipe, cfg, n, seed):
    rng = np.random.default_rng([seed, 105])
    kw = dict(num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"])
    given, est = [], []
    for i in range(n):
        s = S.sample_scene(rng)
        _, depth = S.render(s, cfg["width"])
        # (a) given depth map, plain init image: the shape must appear where the depth map is raised
        init = Image.new("RGB", (cfg["width"], cfg["height"]), S.PALETTE[s["background"]])
        im = dpipe(f"a {s['colour']} {s['shape']}, {s['background']} background", image=init,
                   depth_map=torch.from_numpy(0.1 + depth)[None].to(dpipe.unet.dtype), strength=0.8,
                   generator=torch.Generator().manual_seed(seed * 60000 + i), **kw).images[0]
        got = analyse(im)
        given.append(got["position"] == s["position"] and got["colour"] == s["colour"])
        # (b) depth estimated by the DPT from a render, recoloured by the prompt: the shape must stay in place
        t = S.sample_scene(rng)
        img, _ = S.render(t, cfg["width"])
        new_c = [c for c in S.COLOURS if c not in (t["colour"], t["background"])][rng.integers(6)]
        im = dpipe(f"a {new_c} {t['shape']}, {t['background']} background", image=Image.fromarray(img), strength=1.0,
                   generator=torch.Generator().manual_seed(seed * 70000 + i), **kw).images[0]
        got = analyse(im)
        est.append(got["position"] == t["position"] and got["colour"] == new_c)
    return float(np.mean(given)), float(np.mean(est))


def time_txt2img(pipe, cfg, threads, reps=5):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    kw = dict(width=64, height=64, num_inference_steps=20, guidance_scale=cfg["guidance_scale"])
    pipe("a red circle on the left, blue background", generator=torch.Generator().manual_seed(0), **kw)
    ts = []
    for r in range(reps):
        t0 = time.perf_counter()
        pipe("a red circle on the left, blue background", generator=torch.Generator().manual_seed(r), **kw)
        ts.append(time.perf_counter() - t0)
    torch.set_num_threads(old)
    return float(np.median(ts))


CONTACT_PROMPTS = [
    "a red circle on the left, blue background", "a yellow triangle at the top, black background",
    "a white square in the center, purple background", "a green circle at the bottom, orange background",
    "a blue triangle on the right, yellow background", "an orange square on the left, green background",
    "a purple circle in the center, white background", "a black square at the top, red background",
    "a green triangle on the left, white background", "a red square at the bottom, yellow background",
    "a yellow circle on the right, purple background", "a white triangle in the center, blue background",
]


def contact_sheet(pipe, cfg, path, seed=0, scale=2, cols=4):
    ims = generate(pipe, CONTACT_PROMPTS, cfg, [seed + i for i in range(len(CONTACT_PROMPTS))])
    w = cfg["width"] * scale
    cap_h = 30
    cell_w = max(w, 170)
    rows = (len(ims) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * (w + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (im, p) in enumerate(zip(ims, CONTACT_PROMPTS)):
        x, y = (i % cols) * cell_w, (i // cols) * (w + cap_h)
        sheet.paste(im.resize((w, w), Image.NEAREST), (x + (cell_w - w) // 2, y))
        half = p.split(", ")
        draw.text((x + 3, y + w + 2), half[0], fill="black", font=font)
        if len(half) > 1:
            draw.text((x + 3, y + w + 15), half[1], fill="black", font=font)
    sheet.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/micro")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-edit", type=int, default=100)
    ap.add_argument("--n-variants", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="training/RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_settings(args.model)
    t_start = time.time()
    pipe = load_txt2img(args.model)
    dpipe = load_depth2img(args.model, pipe)
    rows = []
    acc, _, _ = eval_txt2img(pipe, cfg, args.n, args.seed)
    for k in ("colour", "background", "shape", "position"):
        rows.append((f"txt2img {k} accuracy ({args.n} random captions)", f"{acc[k] * 100:.1f}%", f">= {TARGETS[k] * 100:.0f}%", acc[k] >= TARGETS[k]))
    var = eval_variants(pipe, cfg, args.n_variants, args.seed)
    rows.append((f"txt2img variant/partial captions ({args.n_variants}; attributes named)", ", ".join(f"{k} {v * 100:.0f}%" for k, v in var.items()), "-", None))
    div = eval_diversity(pipe, cfg, args.seed)
    rows.append(("seed diversity: mean abs pixel deviation across 4 seeds", f"{div:.1f} /255", "-", None))
    p = eval_vae_psnr(pipe, 200, args.seed)
    rows.append(("VAE PSNR (200 held-out renders)", f"{p:.2f} dB", ">= 30 dB", p >= 30))
    keep, follow = eval_img2img(pipe, cfg, args.n_edit, args.seed)
    rows.append((f"img2img strength 0.3 keeps position ({args.n_edit})", f"{keep * 100:.1f}%", ">= 85%", keep >= 0.85))
    rows.append((f"img2img strength 0.8 follows new colour ({args.n_edit})", f"{follow * 100:.1f}%", ">= 85%", follow >= 0.85))
    given, est = eval_depth2img(dpipe, cfg, args.n_edit, args.seed)
    rows.append((f"depth2img given depth map: shape at raised region + colour ({args.n_edit})", f"{given * 100:.1f}%", ">= 85%", given >= 0.85))
    rows.append((f"depth2img DPT-estimated depth, recolour keeps position ({args.n_edit})", f"{est * 100:.1f}%", ">= 85%", est >= 0.85))
    cores = os.cpu_count() or 1
    threads = app_cpu_threads(cores)  # what the app runs with on this machine
    t_app = time_txt2img(pipe, cfg, threads)
    t_all = time_txt2img(pipe, cfg, cores)
    rows.append((f"64x64 txt2img, 20 steps, {threads} thread(s) as the app sets on {cores} cores (median of 5)",
                 f"{t_app:.3f} s", "< 1 s", t_app < 1))
    rows.append((f"64x64 txt2img, 20 steps, {cores} threads (median of 5)", f"{t_all:.3f} s", "-", None))
    size = sum(f.stat().st_size for f in Path(args.model).rglob("*") if f.is_file())
    rows.append(("models/micro size on disk", f"{size / 1e6:.2f} MB", "< 25 MB", size < 25e6))
    cmd = "python -m training.evaluate " + " ".join(sys.argv[1:])
    lines = ["| check | measured | target | met |", "|---|---|---|---|"]
    for name, val, tgt, ok in rows:
        lines.append(f"| {name} | {val} | {tgt} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    table = "\n".join(lines)
    print(table)
    print(f"eval time {time.time() - t_start:.0f}s")
    if not args.no_write:
        contact_sheet(pipe, cfg, Path(args.model) / layout.CONTACT_SHEET)
        Path(args.results).write_text(
            "# Stepwise micro model: evaluation\n\n"
            f"Command: `{cmd.strip()}` (torch threads {args.threads}; CPU)\n\n"
            f"Shipped settings: {cfg['width']}x{cfg['height']}, {cfg['steps']} steps, guidance {cfg['guidance_scale']}, "
            f"scheduler {cfg['scheduler']}.\n\n{table}\n\n"
            "Training history and diagnosis: [NOTES.md](NOTES.md).\n")


if __name__ == "__main__":
    main()
