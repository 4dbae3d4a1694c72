"""Procedural scene renderer for the Stepwise micro model.

One shape (circle / square / triangle) of one palette colour at one of five
positions on a plain background of another palette colour, plus a matching
depth map (shape raised toward the viewer = 1, background far = 0).
Rendering is supersampled so edges are anti-aliased.
"""
from __future__ import annotations

import numpy as np

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# shape centre, as fractions of (W, H)
ANCHORS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# every word the captions use; each is a single token in the tokenizer
VOCAB_WORDS = sorted(set(COLOURS + SHAPES + ["a", "an", "the", "on", "at", "in", "left", "right", "top",
                                              "bottom", "center", "centre", "middle", "background", "and", "with",
                                              "of", "shape", "colour", "color"]))

# Big enough that circle, square and triangle differ by whole latent pixels (16x16 latents): at radius
# 0.13 the UNet never learned shape from the words (training/NOTES.md).
SIZE = 0.18  # nominal "radius" as a fraction of the width
SIZE_JITTER = 0.10
POS_JITTER = 0.03


def shape_mask(shape: str, cx: float, cy: float, r: float, w: int, h: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage mask in [0,1] of shape (h, w); coordinates in pixels."""
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    X, Y = np.meshgrid(xs, ys)
    if shape == "circle":
        m = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
    elif shape == "square":
        s = 0.88 * r
        m = (np.abs(X - cx) <= s) & (np.abs(Y - cy) <= s)
    elif shape == "triangle":
        R = 1.25 * r  # circumradius of an upward-pointing equilateral triangle
        top = cy - R
        base = cy + R / 2
        half = R * np.sqrt(3) / 2
        t = (Y - top) / (base - top)  # 0 at apex, 1 at base
        m = (t >= 0) & (t <= 1) & (np.abs(X - cx) <= t * half)
    else:
        raise ValueError(shape)
    return m.reshape(h, ss, w, ss).mean(axis=(1, 3)).astype(np.float32)


def sample_scene(rng: np.random.Generator, **fixed) -> dict:
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = fixed.get("colour") or COLOURS[rng.integers(len(COLOURS))]
    position = fixed.get("position") or POSITIONS[rng.integers(len(POSITIONS))]
    bg = fixed.get("background")
    while bg is None or bg == colour:
        bg = COLOURS[rng.integers(len(COLOURS))]
    ax, ay = ANCHORS[position]
    return dict(
        shape=shape, colour=colour, position=position, background=bg,
        cx=ax + rng.uniform(-POS_JITTER, POS_JITTER), cy=ay + rng.uniform(-POS_JITTER, POS_JITTER),
        r=SIZE * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER),
    )


def render(scene: dict, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Returns (rgb uint8 HxWx3, depth float32 HxW in [0,1], 1 = near)."""
    w = h = size
    m = shape_mask(scene["shape"], scene["cx"] * w, scene["cy"] * h, scene["r"] * w, w, h)
    fg = np.array(PALETTE[scene["colour"]], np.float32)
    bg = np.array(PALETTE[scene["background"]], np.float32)
    img = bg[None, None] * (1 - m[..., None]) + fg[None, None] * m[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8), m


def canonical_caption(scene: dict) -> str:
    return f"a {scene['colour']} {scene['shape']} {POSITION_PHRASE[scene['position']]}, {scene['background']} background"


def random_caption(scene: dict, rng: np.random.Generator, p_drop: float = 0.1) -> str:
    """Training caption: canonical most of the time, plus word-order, partial and case variants."""
    u = rng.random()
    if u < p_drop:
        return ""
    obj = f"a {scene['colour']} {scene['shape']}"
    pos = POSITION_PHRASE[scene["position"]]
    if scene["position"] == "center" and rng.random() < 0.2:
        pos = rng.choice(["in the centre", "in the middle"])
    bgp = f"{scene['background']} background"
    variants = [
        (0.40, f"{obj} {pos}, {bgp}"),
        (0.08, f"{bgp}, {obj} {pos}"),
        (0.05, f"{pos}, {obj}, {bgp}"),
        (0.05, f"{obj}, {bgp}, {pos}"),
        (0.05, f"{scene['colour']} {scene['shape']} {pos} {bgp}"),
        (0.08, f"{obj}"),
        (0.07, f"{bgp}"),
        (0.07, f"{obj} {pos}"),
        (0.07, f"{obj}, {bgp}"),
        (0.04, f"{scene['shape']} {pos}, {bgp}"),
        (0.04, f"a {scene['colour']} shape {pos}, {bgp}"),
    ]
    ps = np.array([p for p, _ in variants])
    cap = variants[rng.choice(len(variants), p=ps / ps.sum())][1]
    v = rng.random()
    if v < 0.1:
        cap = cap.upper()
    elif v < 0.2:
        cap = cap.capitalize()
    elif v < 0.25:
        cap = cap.title()
    return cap


def render_batch(n: int, rng: np.random.Generator, size: int = 64):
    scenes = [sample_scene(rng) for _ in range(n)]
    imgs, depths = zip(*(render(s, size) for s in scenes))
    return scenes, np.stack(imgs), np.stack(depths)
