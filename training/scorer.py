"""Deterministic analysis of a generated scene image (no learned components).

background = nearest palette colour to the median border colour; object pixels = pixels far from the
background colour (in the half of the image where each of two objects belongs); colour = nearest palette
colour to the median object pixel; position = nearest anchor to the object's centroid; shape = best IoU
against circle / square / triangle / cross templates fitted to the object's bounding box.
"""
from __future__ import annotations

import numpy as np

from .scenes import ANCHORS, PALETTE, POSITIONS

_PAL = np.array(list(PALETTE.values()), np.float32)
_NAMES = list(PALETTE)
# the half of the image (x0, y0, x1, y1 as fractions) where an object of a two-object scene must be
HALVES = {"left": (0, 0, 0.5, 1), "right": (0.5, 0, 1, 1), "top": (0, 0, 1, 0.5), "bottom": (0, 0.5, 1, 1)}


def nearest_colour(rgb) -> str:
    d = ((_PAL - np.asarray(rgb, np.float32)[None]) ** 2).sum(1)
    return _NAMES[int(d.argmin())]


def _templates(x0, y0, x1, y1, h, w):
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    circle = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    square = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    t = (ys - y0) / max(y1 - y0, 1e-6)
    tri = (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * rx)
    dx, dy = np.abs(xs - cx) / rx, np.abs(ys - cy) / ry  # the renderer's arm half-width is 0.36 of the arm
    cross = square & ((dx <= 0.36) | (dy <= 0.36))
    return {"circle": circle, "square": square, "triangle": tri, "cross": cross}


def analyse(img, region=None) -> dict:
    """img: HxWx3 uint8 array or PIL image; region: (x0, y0, x1, y1) fractions to look for the object in
    (default: everywhere). Returns dict(colour, shape, position, background, fill, area); colour, shape
    and position are None where no object was found."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img).astype(np.float32)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, 0)
    background = nearest_colour(bg_rgb)
    mask = np.sqrt(((a - bg_rgb[None, None]) ** 2).sum(-1)) > 60
    if region is not None:
        x0, y0, x1, y1 = region
        keep = np.zeros_like(mask)
        keep[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = True
        mask &= keep
    out = dict(background=background, colour=None, shape=None, position=None, area=int(mask.sum()), fill=0.0)
    if mask.sum() < (h * w) // 200:
        return out
    ys, xs = np.nonzero(mask)
    out["colour"] = nearest_colour(np.median(a[mask], 0))
    cx, cy = xs.mean() / w, ys.mean() / h
    out["position"] = min(POSITIONS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    x0, x1 = np.percentile(xs, 1), np.percentile(xs, 99) + 1
    y0, y1 = np.percentile(ys, 1), np.percentile(ys, 99) + 1
    out["fill"] = float(mask.sum() / max(1.0, (x1 - x0) * (y1 - y0)))
    best, best_iou = None, -1.0
    for name, t in _templates(x0, y0, x1, y1, h, w).items():
        iou = (t & mask).sum() / max(1, (t | mask).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    out["shape"] = best
    out["iou"] = float(best_iou)
    return out


def score(img, want: dict) -> dict:
    """Per-attribute correctness (bool) for what `want` names: {"background": ..., "objects": [{"colour",
    "shape", "position"}, ...]}, any key left out or None. One object: keys colour, shape, position,
    background. Two objects (each looked for in its own half): background, colour and shape (both
    objects right), and both (both colours and both shapes right)."""
    objs = want.get("objects", [])
    out = {}
    if want.get("background") is not None:
        out["background"] = analyse(img)["background"] == want["background"]
    if len(objs) == 1:
        got = analyse(img)
        out.update({k: got[k] == v for k, v in objs[0].items() if k in ("colour", "shape", "position") and v is not None})
    elif objs:
        got = [analyse(img, HALVES[o["position"]]) for o in objs]
        for k in ("colour", "shape"):
            if all(o.get(k) for o in objs):
                out[k] = all(g[k] == o[k] for g, o in zip(got, objs))
        if "colour" in out and "shape" in out:
            out["both"] = out["colour"] and out["shape"]
    return out
