"""Where each prompt word looks, on the bundled micro model, and what recording it costs (issue 18).

    python -m benchmarks.attention --captions 100 --seed 18 [--json benchmarks/results-attention.json]
    python -m benchmarks.attention --cost [--against /tmp/base] [--rounds 3 --repeats 3]

Fresh captions: scenes drawn by training/scenes.py from `numpy.random.default_rng([seed, 1800])`, a
stream the training never drew from (training/train.py draws from [0, tag, ...] with tags 1-8, 998 and
999, its quick checks from [0..2, 7] and [0, 8]; training/evaluate.py from [1, 100..105]). Each caption
runs through `pipelines.generate` with `record_attention=True` at the model's own settings
(stepwise.json: steps, guidance_scale, scheduler, size), noise seed `seed * 1000 + i`.

Headline, as issue 18 defines it: the map of the step N//2 (1-based; step 10 of 20) of the SHAPE word,
the COLOUR word and the control word "background" peaks (argmax over the latent grid) inside the
object's bounding box, taken from the scene's own geometry in latent pixels. Everything else printed
(every step averaged, per step, per layer) is extra information.

`--cost`: the app path (`benchmarks.run.app_run`: `generate` consumed fully, every frame stored as
the UI stores it; latent-rgb previews, view x_t) with record_attention off and on, and the bare
diffusers call, one intra-op thread, `OMP_WAIT_POLICY=PASSIVE`, at the model's settings; the bytes per
step the kept frames hold (sum of `Frame.nbytes` / steps) and, where the checkout writes one, the run's
.safetensors file. Each round runs one fresh process per checkout: a warm-up of every variant, then
`--repeats` interleaved runs, each timed in wall seconds and in the process's CPU seconds (all its
threads; on a shared machine the steadier of the two). `--against DIR` times another checkout of
Stepwise the same way (its own `pipelines` and `benchmarks.run`; this file run by path), alternating
with this one so drift hits both alike. The bare call is the same code in both: its ratio between them
is the noise between processes, and each checkout's app path over its own bare call (same process)
compares the two with that noise taken out.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it, before torch loads

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import ModelCache, generate, layout, validate_request
from pipelines.cache import BUNDLED, bundled_folder
from training import scenes as S
from training.scorer import score

# pipelines.capture is imported where it is used: `--cost --against DIR` runs this file on a checkout
# from before issue 18, which has no such module

CAPTION_STREAM = 1800  # second entry of the caption generator's seed; no training stream uses it
WORDS = ("shape", "colour", "background")  # the headline's words: the scene's shape, its colour, the control


def fresh_scenes(n: int, seed: int, n_objects: int = 1, stream: int = CAPTION_STREAM) -> list[dict]:
    """`n` scenes of `n_objects` objects (training/scenes.py's `sample_scene`) from a caption stream the
    training never drew from."""
    rng = np.random.default_rng([seed, stream])
    return [S.sample_scene(rng, n_objects) for _ in range(n)]


def object_box(obj: dict, grid: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of one object of a scene in latent pixels of a `grid` x `grid` latent, clipped to
    the grid, from the geometry `training.scenes.shape_mask` draws (square half-side 0.9 r; triangle
    circumradius 1.2 r, apex up, base at cy + R/2: a triangle at the top can reach past the edge)."""
    cx, cy, r = obj["cx"] * grid, obj["cy"] * grid, obj["r"] * grid
    if obj["shape"] in ("circle", "cross"):
        half_w, top, bottom = r, cy - r, cy + r
    elif obj["shape"] == "square":
        half_w, top, bottom = 0.9 * r, cy - 0.9 * r, cy + 0.9 * r
    else:
        big_r = 1.2 * r
        half_w, top, bottom = big_r * np.sqrt(3) / 2, cy - big_r, cy + big_r / 2
    return max(cx - half_w, 0.0), max(top, 0.0), min(cx + half_w, grid), min(bottom, grid)


def peak(attention_map: np.ndarray) -> tuple[int, int]:
    """(row, column) of the map's largest value (the first, on a tie)."""
    return np.unravel_index(int(np.argmax(attention_map)), attention_map.shape)


def peaks_inside(attention_map: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Whether the latent pixel where the map peaks has its centre inside `box` (latent pixels)."""
    row, col = peak(attention_map)
    x0, y0, x1, y1 = box
    return x0 <= col + 0.5 <= x1 and y0 <= row + 0.5 <= y1


@dataclass
class CaptionRun:
    """One fresh caption's run: its scene, prompt, tokens and every step's maps (N, T, h, w) float32."""

    scene: dict
    prompt: str
    tokens: tuple[str, ...]
    maps: np.ndarray
    image: object  # the final PIL image
    layers: dict[str, np.ndarray] | None = None  # per cross-attention layer: (N, T, h, w), with --layers
    layer_sides: dict[str, int] | None = None  # each layer's own grid side (16, 8 or 4 on the micro UNet)

    def words(self) -> dict[str, int]:
        """Token index of the (first) object's shape word, its colour word and "background" (each one
        token of the micro tokenizer; the scene's background colour differs from its objects')."""
        o = self.scene["objects"][0]
        return {"shape": self.tokens.index(o["shape"]), "colour": self.tokens.index(o["colour"]),
                "background": self.tokens.index("background")}

    def box(self) -> tuple[float, float, float, float]:
        return object_box(self.scene["objects"][0], self.maps.shape[-1])


def run_caption(cache: ModelCache, source: str, settings: dict, scene: dict, seed: int,
                layers: bool = False) -> CaptionRun:
    """Run `scene`'s canonical caption through the app's `generate` with attention recorded."""
    prompt = S.canonical_caption(scene)
    request = validate_request(dict(mode="txt2img", prompt=prompt, seed=seed, record_attention=True,
                                    preview="latent-rgb", **settings))
    per_layer = _LayerMaps() if layers else None
    unet = cache.pipeline("txt2img", source).unet
    with per_layer.hooked(unet) if per_layer else contextlib.nullcontext():
        items = list(generate(request, cache, source=source))
    frames, final = items[:-1], items[-1]
    maps = np.stack([f.attention.tensor().float().numpy() for f in frames])
    run = CaptionRun(scene, prompt, frames[0].tokens, maps, final.image)
    if per_layer:
        from pipelines.capture import prompt_tokens

        positions, _ = prompt_tokens(cache.pipeline("txt2img", source), cache.checkpoint(source).family, prompt)
        run.layers, run.layer_sides = per_layer.stacked(positions), per_layer.sides
    return run


class _LayerMaps:
    """Each cross-attention layer's (T, h, w) maps kept apart, one set per denoiser call, on the UNet's
    `sample_size` grid (the micro model's latent grid): extra information on which resolutions
    localise. Wraps the processors outside the run's own recorder, which wraps these in turn."""

    def __init__(self):
        self.calls: list[dict[str, torch.Tensor]] = []
        self._current: dict[str, torch.Tensor] = {}
        self._grid = (0, 0)
        self.sides: dict[str, int] = {}

    @contextlib.contextmanager
    def hooked(self, unet):
        originals = unet.attn_processors
        self._grid = (unet.config.sample_size, unet.config.sample_size)
        wrapped = {name: _NamedLayer(name, proc, self)
                   if unet.get_submodule(name.removesuffix(".processor")).is_cross_attention else proc
                   for name, proc in originals.items()}
        unet.set_attn_processor(wrapped)
        handle = unet.register_forward_hook(lambda *_: self._end_call())
        try:
            yield self
        finally:
            handle.remove()
            unet.set_attn_processor(originals)

    def add(self, name: str, probs: torch.Tensor, text_len: int) -> None:
        from pipelines.capture import AttentionRecorder

        recorder = AttentionRecorder(list(range(text_len)), self._grid)
        recorder.add(probs)
        self._current[name] = recorder.take()
        self.sides[name] = round(probs.shape[2] ** 0.5)

    def _end_call(self) -> None:
        self.calls.append(self._current)
        self._current = {}

    def stacked(self, positions: list[int]) -> dict[str, np.ndarray]:
        """{layer name: (N, T, h, w)} at the prompt's token `positions`."""
        return {name: np.stack([call[name][positions].numpy() for call in self.calls]) for name in self.calls[0]}


class _NamedLayer:
    def __init__(self, name, processor, sink: _LayerMaps):
        self.name, self.processor, self.sink = name, processor, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            from pipelines.capture import cross_attention_probs

            with torch.no_grad():  # the prompt's row, the last (as the run's own recorder reads it)
                probs = cross_attention_probs(attn, hidden_states[-1:], encoder_hidden_states[-1:])
            self.sink.add(self.name, probs, probs.shape[-1])
        return self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def mid_step(n_steps: int) -> int:
    """The issue's mid-run step, 1-based (its maps are `maps[mid - 1]`): N // 2, step 10 of 20."""
    return n_steps // 2


def shares(runs: list[CaptionRun], pick) -> dict[str, float]:
    """Share of runs whose word map, `pick(run)` -> (T, h, w), peaks inside the object's box, per word."""
    out = {}
    for word in WORDS:
        out[word] = float(np.mean([peaks_inside(pick(r)[r.words()[word]], r.box()) for r in runs]))
    return out


def localisation(runs: list[CaptionRun]) -> dict:
    """The headline shares (mid-run step N//2) and the extra aggregates."""
    n_steps = runs[0].maps.shape[0]
    mid = mid_step(n_steps)
    grid = runs[0].maps.shape[-1]
    result = {
        "steps": n_steps, "mid_step": mid,
        "headline": shares(runs, lambda r: r.maps[mid - 1]),
        "every_step_averaged": shares(runs, lambda r: r.maps.mean(0)),
        "per_step_shape": [shares(runs, lambda r, i=i: r.maps[i])["shape"] for i in range(n_steps)],
        "per_step_colour": [shares(runs, lambda r, i=i: r.maps[i])["colour"] for i in range(n_steps)],
        # a peak drawn uniformly over the grid would land inside the box this often
        "chance": float(np.mean([_box_pixels(r.box(), grid) / grid ** 2 for r in runs])),
    }
    result["captions_rows"] = [caption_row(r, mid) for r in runs]
    if runs[0].layers is not None:
        result["per_layer_mid"] = {name: shares(runs, lambda r, name=name: r.layers[name][mid - 1])
                                   for name in runs[0].layers}
        sides = sorted(set(runs[0].layer_sides.values()), reverse=True)
        result["per_resolution_mid"] = {
            f"{side}x{side}": shares(runs, lambda r, side=side: np.mean(
                [m[mid - 1] for name, m in r.layers.items() if r.layer_sides[name] == side], axis=0))
            for side in sides}
    return result


def caption_row(run: CaptionRun, mid: int) -> dict:
    """One caption's mid-run result: each word's peak (row, column) and whether it is inside the box, and
    what training/scorer.py reads in the final image (did the model draw the scene it was asked for)."""
    maps = run.maps[mid - 1]
    row = {"prompt": run.prompt, "box": [round(v, 2) for v in run.box()]}
    for word, k in run.words().items():
        row[word] = {"peak": [int(v) for v in peak(maps[k])], "inside": bool(peaks_inside(maps[k], run.box()))}
    row["image_matches"] = score(run.image, S.named(run.scene))
    return row


def binding(runs: list[CaptionRun]) -> dict:
    """Two-object captions: share of colour words whose mid-run map (step N//2) peaks inside their own
    object's box, and share whose peak is nearer their own object's centre than the other's."""
    mid = mid_step(runs[0].maps.shape[0])
    grid = runs[0].maps.shape[-1]
    inside, nearer = [], []
    for r in runs:
        objects = r.scene["objects"]
        for o, other in zip(objects, objects[::-1]):
            m = r.maps[mid - 1][r.tokens.index(o["colour"])]
            inside.append(peaks_inside(m, object_box(o, grid)))
            row, col = peak(m)
            d_own, d_other = (np.hypot(col + 0.5 - x["cx"] * grid, row + 0.5 - x["cy"] * grid) for x in (o, other))
            nearer.append(d_own < d_other)
    return {"mid_step": mid, "inside": float(np.mean(inside)), "nearer": float(np.mean(nearer))}


def _box_pixels(box, grid: int) -> int:
    x0, y0, x1, y1 = box
    centres = np.arange(grid) + 0.5
    return int(((centres >= x0) & (centres <= x1)).sum() * ((centres >= y0) & (centres <= y1)).sum())


def contact_image(runs: list[CaptionRun], path: Path, mid: int, scale: int = 6) -> None:
    """One row per caption: the final image, then the mid-run maps of the shape word, the colour word and
    "background", each with the object's box (green) and the map's peak (red dot)."""
    from PIL import Image, ImageDraw

    grid = runs[0].maps.shape[-1]
    cell = grid * scale
    sheet = Image.new("RGB", (4 * cell, len(runs) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, r in enumerate(runs):
        y = row * cell
        sheet.paste(r.image.resize((cell, cell)), (0, y))
        for col, word in enumerate(WORDS, start=1):
            m = r.maps[mid - 1][r.words()[word]]
            grey = (255 * m / max(m.max(), 1e-8)).astype(np.uint8)
            sheet.paste(Image.fromarray(grey).resize((cell, cell), Image.NEAREST).convert("RGB"), (col * cell, y))
            x0, y0, x1, y1 = (v * scale for v in r.box())
            draw.rectangle((col * cell + x0, y + y0, col * cell + x1, y + y1), outline=(0, 200, 0))
            pr, pc = peak(m)
            cx, cy = col * cell + (pc + 0.5) * scale, y + (pr + 0.5) * scale
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(230, 0, 0))
    sheet.save(path)



def model_settings(source: str) -> dict:
    """The model's own steps, guidance_scale, scheduler and size (its stepwise.json)."""
    card = layout.read_card(Path(source))
    side = card.get("width", 64)
    return dict(steps=card.get("steps", 20), guidance_scale=card.get("guidance_scale", 4.0),
                scheduler=card.get("scheduler", "DDIM"), width=side, height=card.get("height", side))


def time_app_path(variants: list[str], repeats: int, prompt: str = "a red circle on the left, blue background",
                  seed: int = 7) -> dict:
    """In this process, with whatever `pipelines` and `benchmarks.run` it imports: seconds of each of
    `repeats` interleaved runs per variant ("bare": the diffusers call, "off"/"on": the app path with
    record_attention off/on), after one warm-up each; and bytes per step of the frames the app path kept."""
    import tempfile

    from benchmarks.run import app_run, bare_run

    torch.set_num_threads(1)
    source, cache = str(bundled_folder()), ModelCache(device="cpu")
    base = dict(mode="txt2img", prompt=prompt, seed=seed, preview="latent-rgb", view="x_t", **model_settings(source))
    requests = {v: validate_request(dict(base, record_attention=True) if v == "on" else base) for v in variants}
    runs = {v: (lambda v=v: bare_run(cache, requests[v], source)) if v == "bare"
            else (lambda v=v: app_run(cache, requests[v], source, Path(tempfile.mkdtemp())))
            for v in variants}
    try:  # the run's .safetensors file (issue 18); a checkout from before it has no such writer
        from pipelines.export import save_run_tensors
    except ImportError:
        save_run_tensors = None
    kept, saved, save_seconds = {}, {}, {}
    for v, fn in runs.items():  # warm-up; the frames' bytes and the file's size
        view = fn()
        if v == "bare":
            continue
        kept[v] = sum(f.nbytes for f in view.frames) / base["steps"]
        if save_run_tensors is not None:
            start = time.perf_counter()
            path = save_run_tensors(view.frames, view.folder / "run.safetensors",
                                    {"model": source, "settings": requests[v].settings()})
            save_seconds[v] = time.perf_counter() - start
            saved[v] = path.stat().st_size / base["steps"]
    seconds, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(repeats):
        for v, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            seconds[v].append(time.perf_counter() - start)
            cpu[v].append(time.process_time() - start_cpu)
    return {"seconds": seconds, "cpu_seconds": cpu, "bytes_per_step": kept, "file_bytes_per_step": saved,
            "save_seconds": save_seconds, "steps": base["steps"]}


def _child(folder: Path, variants: list[str], repeats: int) -> dict:
    """`time_app_path` in a fresh process on the checkout in `folder` (its own pipelines, models, benchmarks)."""
    env = dict(os.environ, PYTHONPATH=str(folder), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", ",".join(variants),
                          "--repeats", str(repeats)], cwd=folder, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cost(rounds: int, repeats: int, against: str | None) -> dict:
    """Interleaved rounds of `time_app_path` in this checkout (bare, off, on) and in `against` (bare, off)."""
    here = Path(__file__).resolve().parents[1]
    checkouts = {"now": (here, ["bare", "off", "on"])}
    if against:
        checkouts["before"] = (Path(against).resolve(), ["bare", "off"])
    samples = {(c, v): [] for c, (_, vs) in checkouts.items() for v in vs}
    cpu = {key: [] for key in samples}
    per_round, per_round_cpu, kept, saved = [], [], {}, {}
    for r in range(rounds):
        order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
        medians, medians_cpu = {}, {}
        for name in order:
            folder, variants = checkouts[name]
            got = _child(folder, variants, repeats)
            for v in variants:
                samples[(name, v)] += got["seconds"][v]
                cpu[(name, v)] += got["cpu_seconds"][v]
                medians[(name, v)] = statistics.median(got["seconds"][v])
                medians_cpu[(name, v)] = statistics.median(got["cpu_seconds"][v])
            kept.update({(name, v): b for v, b in got["bytes_per_step"].items()})
            saved.update({(name, v): (b, got["save_seconds"][v]) for v, b in got.get("file_bytes_per_step", {}).items()})
            steps = got["steps"]
        per_round.append(medians)
        per_round_cpu.append(medians_cpu)
        print(f"  round {r + 1}: " + ", ".join(f"{c} {v} {m:.3f} s ({medians_cpu[c, v]:.3f} CPU)"
                                              for (c, v), m in medians.items()), flush=True)

    def ratios(a, b):
        return {"median": statistics.median(samples[a]) / statistics.median(samples[b]),
                "rounds": [m[a] / m[b] for m in per_round],
                "cpu_median": statistics.median(cpu[a]) / statistics.median(cpu[b]),
                "cpu_rounds": [m[a] / m[b] for m in per_round_cpu]}

    result = {"rounds": rounds, "repeats": repeats, "steps": steps, "threads": 1,
              "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "seconds_median": {f"{c} {v}": statistics.median(x) for (c, v), x in samples.items()},
              "cpu_seconds_median": {f"{c} {v}": statistics.median(x) for (c, v), x in cpu.items()},
              "bytes_per_step": {f"{c} {v}": b for (c, v), b in kept.items()},
              "file_bytes_per_step": {f"{c} {v}": b for (c, v), (b, _) in saved.items()},
              "file_save_seconds": {f"{c} {v}": t for (c, v), (_, t) in saved.items()},
              "on_over_off": ratios(("now", "on"), ("now", "off")),
              "off_over_bare": ratios(("now", "off"), ("now", "bare"))}
    if against:
        result["off_over_bare_before"] = ratios(("before", "off"), ("before", "bare"))
        result["off_now_over_before"] = ratios(("now", "off"), ("before", "off"))
        result["bare_now_over_before"] = ratios(("now", "bare"), ("before", "bare"))
    result["samples"] = {f"{c} {v}": {"seconds": samples[c, v], "cpu_seconds": cpu[c, v]} for c, v in samples}
    return result


def print_cost(r: dict) -> None:
    print(f"app path cost of record_attention · {r['steps']} steps · 1 thread · {r['rounds']} rounds x "
          f"{r['repeats']} runs · load average {r['load_average'][0]:.2f} on {r['cpus']} cores at the end")
    print(f"  {'':<12} {'wall ms':>9} {'CPU ms':>9} {'kept per step':>16}")
    for name, t in r["seconds_median"].items():
        b = r["bytes_per_step"].get(name)
        print(f"  {name:<12} {t * 1000:9.1f} {r['cpu_seconds_median'][name] * 1000:9.1f}"
              + (f" {b:>10.0f} bytes" if b else ""))
    for name, b in r["file_bytes_per_step"].items():
        print(f"  {name}: the run's .safetensors file {b:.0f} bytes per step, "
              f"written in {r['file_save_seconds'][name] * 1000:.1f} ms (once, last round)")
    print("  ratios of medians, wall [per round] and CPU [per round]")
    for key in ("on_over_off", "off_over_bare", "off_over_bare_before", "off_now_over_before", "bare_now_over_before"):
        if key in r:
            v = r[key]
            print(f"  {key.replace('_', ' '):<22} x{v['median']:.3f} [" + " ".join(f"{x:.2f}" for x in v["rounds"])
                  + f"]  CPU x{v['cpu_median']:.3f} [" + " ".join(f"{x:.2f}" for x in v["cpu_rounds"]) + "]")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BUNDLED)
    p.add_argument("--captions", type=int, default=100)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", action="store_true", help="also keep each cross-attention layer's maps")
    p.add_argument("--json", default=None)
    p.add_argument("--contact", default=None, help="write a contact image of the first 8 captions here")
    p.add_argument("--cost", action="store_true", help="time the app path with record_attention off and on")
    p.add_argument("--against", default=None, help="with --cost: another Stepwise checkout to time alike")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = time_app_path(args.child.split(","), args.repeats)
        print(json.dumps(result))
        return result
    if args.cost:
        result = cost(args.rounds, args.repeats, args.against)
        print_cost(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    torch.set_num_threads(args.threads)

    source = str(bundled_folder()) if args.model == BUNDLED else args.model
    settings = model_settings(source)
    cache = ModelCache(device="cpu")
    runs = [run_caption(cache, source, settings, scene, args.seed * 1000 + i, args.layers)
            for i, scene in enumerate(fresh_scenes(args.captions, args.seed))]
    result = {"model": source, "settings": settings, "captions": args.captions, "seed": args.seed,
              "caption_stream": [args.seed, CAPTION_STREAM], "threads": args.threads,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
              **localisation(runs)}
    print_table(result)
    if args.contact:
        contact_image(runs[:8], Path(args.contact), result["mid_step"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


def _short(layer: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor' -> 'up 1.0'."""
    parts = layer.split(".")
    return f"{parts[0].split('_')[0]} {parts[1]}.{parts[3]}" if parts[0] != "mid_block" else "mid"


def print_table(r: dict) -> None:
    s = r["settings"]
    print(f"{r['captions']} fresh captions (seed {r['seed']}) · {s['width']}x{s['height']} · {s['steps']} steps · "
          f"guidance {s['guidance_scale']} · {s['scheduler']}")
    print(f"share of captions whose word's map peaks inside the object's box (chance {r['chance']:.2f})")
    print(f"  {'map':<34}{'shape':>8}{'colour':>8}{'background':>12}")
    rows = [(f"step {r['mid_step']} of {r['steps']} (headline)", r["headline"]),
            ("every step averaged", r["every_step_averaged"])]
    rows += [(f"step {r['mid_step']}, {side} layers averaged", v) for side, v in r.get("per_resolution_mid", {}).items()]
    rows += [(f"step {r['mid_step']}, {_short(name)}", v) for name, v in r.get("per_layer_mid", {}).items()]
    for label, v in rows:
        print(f"  {label:<34}{v['shape']:>8.2f}{v['colour']:>8.2f}{v['background']:>12.2f}")
    rows = r["captions_rows"]
    misses = [row for row in rows if not row["shape"]["inside"]]
    wrong = sum(not row["image_matches"]["shape"] for row in rows)
    print(f"  shape word outside the box at step {r['mid_step']}: {len(misses)} captions, of which the final image "
          f"has the wrong shape in {sum(not row['image_matches']['shape'] for row in misses)} "
          f"(wrong shape in {wrong} of all {len(rows)} images, training/scorer.py)")
    print("  shape word per step:  " + " ".join(f"{v:.2f}" for v in r["per_step_shape"]))
    print("  colour word per step: " + " ".join(f"{v:.2f}" for v in r["per_step_colour"]))
    print(f"  median over steps: shape {statistics.median(r['per_step_shape']):.2f}, "
          f"colour {statistics.median(r['per_step_colour']):.2f}")


if __name__ == "__main__":
    main()
