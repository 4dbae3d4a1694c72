"""Procedural scene renderer for the Stepwise micro model.

A scene is one or two objects (circle / square / triangle / cross, one of 8 palette colours, small or
big) on a plain background of another palette colour; one object sits at one of five positions, two sit
left and right or top and bottom. Each scene comes with a depth map (objects raised toward the viewer =
1, background far = 0). Rendering is supersampled, so edges are anti-aliased.

A scene is a dict: {"background": colour, "objects": [{"shape", "colour", "position", "size", "cx",
"cy", "r"}, ...]}, with cx, cy, r as fractions of the image width.
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
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = {"small": 0.15, "big": 0.22}  # "radius" as a fraction of the width
POSITIONS = ["left", "right", "top", "bottom", "center"]
PAIRS = [("left", "right"), ("top", "bottom")]  # where two objects go
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# object centre, as fractions of (W, H)
ANCHORS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# every word the captions use; each is a single token in the tokenizer
VOCAB_WORDS = sorted(set(COLOURS + SHAPES + list(SIZES) + [
    "a", "an", "the", "on", "at", "in", "left", "right", "top", "bottom", "center", "centre", "middle",
    "background", "and", "with", "of", "shape", "colour", "color", "large"]))

SIZE_JITTER = 0.08  # within a size class
POS_JITTER = 0.05  # left open by every caption: seeds move the object this much
PAIR_SCALE = 0.85  # two objects are drawn a little smaller, so each stays in its half


def shape_mask(shape: str, cx: float, cy: float, r: float, w: int, h: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage mask in [0,1] of shape (h, w); coordinates in pixels. `r` is the circle's
    and the cross's radius; the square's half side is 0.9 r (about the circle's area), the triangle's
    circumradius 1.2 r, the cross's arms 0.72 r wide."""
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    X, Y = np.meshgrid(xs, ys)
    dx, dy = np.abs(X - cx), np.abs(Y - cy)
    if shape == "circle":
        m = dx ** 2 + dy ** 2 <= r * r
    elif shape == "square":
        m = (dx <= 0.9 * r) & (dy <= 0.9 * r)
    elif shape == "triangle":
        R = 1.2 * r  # circumradius of an upward-pointing equilateral triangle
        top, base = cy - R, cy + R / 2
        t = (Y - top) / (base - top)  # 0 at apex, 1 at base
        m = (t >= 0) & (t <= 1) & (dx <= t * R * np.sqrt(3) / 2)
    elif shape == "cross":
        arm = 0.36 * r
        m = ((dx <= arm) & (dy <= r)) | ((dy <= arm) & (dx <= r))
    else:
        raise ValueError(shape)
    return m.reshape(h, ss, w, ss).mean(axis=(1, 3)).astype(np.float32)


def _pick(rng, options, exclude=()):
    options = [o for o in options if o not in exclude]
    return options[rng.integers(len(options))]


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> dict:
    """A random scene; `n_objects` 1 or 2 (None: two in 40% of scenes)."""
    n = n_objects or (2 if rng.random() < 0.4 else 1)
    background = _pick(rng, COLOURS)
    if n == 1:
        positions = [_pick(rng, POSITIONS)]
    else:
        positions = list(PAIRS[rng.integers(len(PAIRS))])
        if rng.random() < 0.5:
            positions.reverse()  # which one the caption names first
    objects = []
    for pos in positions:
        size = _pick(rng, list(SIZES))
        ax, ay = ANCHORS[pos]
        objects.append(dict(
            shape=_pick(rng, SHAPES), colour=_pick(rng, COLOURS, [background] + [o["colour"] for o in objects]),
            position=pos, size=size,
            cx=ax + rng.uniform(-POS_JITTER, POS_JITTER), cy=ay + rng.uniform(-POS_JITTER, POS_JITTER),
            r=SIZES[size] * (PAIR_SCALE if n == 2 else 1.0) * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)))
    return dict(background=background, objects=objects)


def render(scene: dict, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Returns (rgb uint8 HxWx3, depth float32 HxW in [0,1], 1 = near)."""
    img = np.broadcast_to(np.array(PALETTE[scene["background"]], np.float32), (size, size, 3)).copy()
    depth = np.zeros((size, size), np.float32)
    for o in scene["objects"]:
        m = shape_mask(o["shape"], o["cx"] * size, o["cy"] * size, o["r"] * size, size, size)
        img = img * (1 - m[..., None]) + np.array(PALETTE[o["colour"]], np.float32) * m[..., None]
        depth = np.maximum(depth, m)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), depth


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o: dict, size: bool = False, colour: bool = True, shape: bool = True) -> str:
    words = ([o["size"]] if size else []) + ([o["colour"]] if colour else []) + [o["shape"] if shape else "shape"]
    return f"{_article(words[0])} {' '.join(words)}"


def canonical_caption(scene: dict) -> str:
    """Full caption, size left to the seed: 'a red circle on the left and a blue square on the right,
    yellow background'."""
    objs = " and ".join(f"{object_phrase(o)} {POSITION_PHRASE[o['position']]}" for o in scene["objects"])
    return f"{objs}, {scene['background']} background"


def named(scene: dict) -> dict:
    """What a full caption names: {"background": ..., "objects": [{"colour", "shape", "position"}, ...]}."""
    return dict(background=scene["background"],
                objects=[{k: o[k] for k in ("colour", "shape", "position")} for o in scene["objects"]])


def default_layout(scene: dict) -> bool:
    """Whether the objects sit where a caption that names no position puts them: one object in the
    centre, two side by side with the first named on the left (reading order). Left open among five
    places, a model this small hedged between them and drew a smear or two objects (training/NOTES.md,
    session 17); an unnamed position means the centre, as it mostly does in photographs and in SD."""
    return [o["position"] for o in scene["objects"]] in (["center"], ["left", "right"])


def random_caption(scene: dict, rng: np.random.Generator, p_drop: float = 0.1, any_layout: bool = False) -> str:
    """Training caption: the canonical form most of the time, plus size words, other word orders,
    partial captions (what they leave out is the seed's to choose) and case variants. Positions go
    unnamed only for a `default_layout` scene (60% of the time), or for any scene with `any_layout`
    (depth2img: the depth map places the objects)."""
    if rng.random() < p_drop:
        return ""
    objs = scene["objects"]
    with_size = rng.random() < 0.4
    phrases = []
    for o in objs:
        u = rng.random()
        colour, shape = u >= 0.05, u < 0.95  # 5% "a circle", 5% "a red shape"
        pos = POSITION_PHRASE[o["position"]]
        if o["position"] == "center" and rng.random() < 0.2:
            pos = rng.choice(["in the centre", "in the middle"])
        phrases.append((object_phrase(o, with_size, colour, shape), pos))
    bgp = f"{scene['background']} background"
    full = " and ".join(f"{p} {q}" for p, q in phrases)
    bare = " and ".join(p for p, _ in phrases)
    if (any_layout or default_layout(scene)) and rng.random() < 0.6:
        variants = [(0.5, bare), (0.4, f"{bare}, {bgp}"), (0.1, bgp)]
    else:
        variants = [(0.55, f"{full}, {bgp}"), (0.1, f"{bgp}, {full}"), (0.05, f"{full} {bgp}"), (0.15, full),
                    (0.1, f"{phrases[0][1]}, {phrases[0][0]}, {bgp}" if len(objs) == 1 else full), (0.05, bgp)]
    ps = np.array([p for p, _ in variants])
    cap = variants[rng.choice(len(variants), p=ps / ps.sum())][1]
    v = rng.random()
    if v < 0.08:
        cap = cap.upper()
    elif v < 0.16:
        cap = cap.capitalize()
    elif v < 0.2:
        cap = cap.title()
    return cap


def render_batch(n: int, rng: np.random.Generator, size: int = 128, n_objects: int | None = None):
    scenes = [sample_scene(rng, n_objects) for _ in range(n)]
    imgs, depths = zip(*(render(s, size) for s in scenes))
    return scenes, np.stack(imgs), np.stack(depths)
