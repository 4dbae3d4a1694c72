"""Deterministic analysis of a generated scene image (no learned components).

background = nearest palette colour to the median border colour; shape pixels = pixels far from the
background colour; colour = nearest palette colour to the median shape pixel; position = nearest anchor to
the shape centroid; shape = best IoU against circle / square / triangle templates fitted to the bounding box.
"""
from __future__ import annotations

import numpy as np

from .scenes import ANCHORS, PALETTE, POSITIONS

_PAL = np.array(list(PALETTE.values()), np.float32)
_NAMES = list(PALETTE)


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
    return {"circle": circle, "square": square, "triangle": tri}


def analyse(img) -> dict:
    """img: HxWx3 uint8 array or PIL image. Returns dict(colour, shape, position, background, fill, area)."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img).astype(np.float32)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, 0)
    background = nearest_colour(bg_rgb)
    dist = np.sqrt(((a - bg_rgb[None, None]) ** 2).sum(-1))
    mask = dist > 60
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
    """Per-attribute correctness (bool) for the attributes present in `want`."""
    got = analyse(img)
    return {k: got[k] == want[k] for k in ("colour", "shape", "position", "background") if want.get(k) is not None}
