"""The bundled model folder's layout: the one place that names its parts.

`models/micro` (written by training/train.py), the tiny random checkpoints
(pipelines/tiny.py) and the GPU benchmark's checkpoints (benchmarks/gpu.py) all
use it; the app, the cache, previews and training/evaluate.py read it. A folder:

- a diffusers `StableDiffusionPipeline` (`model_index.json`, `unet/`, `vae/`, ...);
- `depth_unet/`: the depth2img UNet (SD 2-depth layout, in_channels=5), run with the
  folder's own VAE, text encoder, tokenizer and scheduler;
- `depth_estimator/`: a `DPTForDepthEstimation` and its `DPTImageProcessor`;
- `tiny_vae/` (optional): an `AutoencoderTiny` for the tiny-vae preview;
- `latent_rgb.json` (optional): the latent->RGB preview map, {"matrix": C x 3, "bias": 3,
  "source": how it was made};
- `stepwise.json` (optional): the model's card: its settings (width, height, steps,
  guidance_scale, scheduler), example prompts and vocabulary;
- `UNTRAINED` (optional): random weights; the UI says so;
- `contact_sheet.png` (optional): training/evaluate.py's samples.

Plain paths and JSON only: no torch here. Components are duck-typed (`save_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED = "bundled"  # the source name of the bundled model (`--model`'s default)
BUNDLED_FOLDER = REPO_ROOT / "models" / "micro"

MODEL_INDEX = "model_index.json"
DEPTH_UNET = "depth_unet"
DEPTH_ESTIMATOR = "depth_estimator"
TINY_VAE = "tiny_vae"
LATENT_RGB = "latent_rgb.json"
CARD = "stepwise.json"
UNTRAINED = "UNTRAINED"
CONTACT_SHEET = "contact_sheet.png"


def is_pipeline(folder: Path) -> bool:
    """Whether `folder` holds a diffusers pipeline (its model_index.json)."""
    return (Path(folder) / MODEL_INDEX).is_file()


def has_depth(folder: Path) -> bool:
    """Whether `folder` carries the bundled layout's depth UNet."""
    return (Path(folder) / DEPTH_UNET).is_dir()


def tiny_vae_folder(folder: Path) -> Path | None:
    """`folder`'s tiny autoencoder subfolder, or None when it has none."""
    path = Path(folder) / TINY_VAE
    return path if path.is_dir() else None


def save_depth(folder: Path, depth_unet, depth_estimator, feature_extractor) -> None:
    """Write the depth2img parts beside a saved txt2img pipeline."""
    folder = Path(folder)
    depth_unet.save_pretrained(folder / DEPTH_UNET)
    depth_estimator.save_pretrained(folder / DEPTH_ESTIMATOR)
    feature_extractor.save_pretrained(folder / DEPTH_ESTIMATOR)


def save_tiny_vae(folder: Path, tiny_vae) -> None:
    tiny_vae.save_pretrained(Path(folder) / TINY_VAE)


def read_latent_rgb(folder: Path) -> dict[str, Any] | None:
    """`folder`'s latent->RGB map ({"matrix": C x 3 lists, "bias": 3, ...}), or None when it has none."""
    path = Path(folder) / LATENT_RGB
    return json.loads(path.read_text()) if path.is_file() else None


def write_latent_rgb(folder: Path, data: dict[str, Any]) -> None:
    (Path(folder) / LATENT_RGB).write_text(json.dumps(data, indent=2) + "\n")


def read_card(folder: Path) -> dict[str, Any]:
    """`folder`'s stepwise.json ({} when it has none). Raises `ValueError` for a file that is not JSON."""
    path = Path(folder) / CARD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_card(folder: Path, card: dict[str, Any]) -> None:
    (Path(folder) / CARD).write_text(json.dumps(card, indent=2) + "\n")


def is_untrained(folder: Path) -> bool:
    return (Path(folder) / UNTRAINED).exists()


def mark_untrained(folder: Path) -> None:
    (Path(folder) / UNTRAINED).write_text("Random weights built from configs; not a trained model.\n")
