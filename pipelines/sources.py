"""Models the way users keep them: single checkpoint files and folders of models.

- A single file (`.safetensors`, `.ckpt`: what AUTOMATIC1111, ComfyUI and Forge read) holds
  weights only. Its architecture is what diffusers' own `infer_diffusers_model_type` says;
  `Family.single_file_types` maps that to a family. The configs that describe it (model_index.json,
  */config.json, tokenizer files) come from `--config` (a diffusers folder or hub id) or else from
  the repo diffusers names for that type (`DIFFUSERS_DEFAULT_PIPELINE_PATHS`), out of the HF cache.
- A models folder (`--models-dir`): every diffusers folder (a subfolder with model_index.json)
  and every single file in it, each with its family, or with the reason it cannot load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    DIFFUSERS_DEFAULT_PIPELINE_PATHS,
    infer_diffusers_model_type,
)
from huggingface_hub import snapshot_download
from safetensors import safe_open

from .families import SINGLE_FILE_KINDS, Family, UnknownFamily, family_of, family_of_single_file
from . import layout
from .protocol import ModelLoadError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# the files diffusers' from_single_file fetches for a config repo (`_download_diffusers_model_config_from_hub`)
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]
LDM_UNET_KEY = CHECKPOINT_KEY_NAMES["inpainting"]  # model.diffusion_model.input_blocks.0.0.weight: any LDM UNet




def is_single_file(source: str) -> bool:
    return Path(source).suffix.lower() in SINGLE_FILE_SUFFIXES


def read_tensor_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as shape-only (meta) tensors, key -> tensor; a
    `.safetensors` file's header only, a `.ckpt` memory-mapped. Raises `ModelLoadError`
    naming the file when it is empty or not a checkpoint."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path} is an empty file, not a checkpoint; copy it again")
        if path.suffix.lower() == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        try:  # a zip-format torch.save file maps without reading; older pickles load whole
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{path} holds no tensors, so it is not a checkpoint")
        return {k: v.to("meta") for k, v in state.items() if isinstance(v, torch.Tensor)}
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, zipfile and pickle each raise their own on random bytes
        raise ModelLoadError(f"{path} is not a {path.suffix} checkpoint (it cannot be read as one: {err})") from None


def single_file_type(path: str | Path) -> tuple[str, bool]:
    """What diffusers' `infer_diffusers_model_type` calls the checkpoint at `path`, and whether
    the file says so itself. Its last resort is "v1": that is sure only when SD 1.x's key is there;
    a file with any LDM UNet (a small or unusual SD) is "v1" unsure, and a file without one is of
    no architecture diffusers knows (`ModelLoadError` naming a few of its keys)."""
    shapes = read_tensor_shapes(path)
    try:
        model_type = infer_diffusers_model_type(shapes)
    except Exception as err:  # noqa: BLE001 - its shape checks assume the keys it looked for
        raise ModelLoadError(f"{path}: diffusers cannot tell its architecture ({err})") from None
    if model_type != "v1" or CHECKPOINT_KEY_NAMES["v1"] in shapes:
        return model_type, True
    if LDM_UNET_KEY in shapes:
        return model_type, False
    some = ", ".join(list(shapes)[:4]) + (", ..." if len(shapes) > 4 else "")
    raise ModelLoadError(
        f"{path} is a checkpoint of an architecture diffusers does not know ({len(shapes)} tensors: {some}); "
        f"Stepwise runs single files of {SINGLE_FILE_KINDS}"
    )


def config_folder(repo: str) -> Path:
    """The configs of hub repo `repo` (no weights), from the HF cache or, when online, the hub.
    Raises `ModelLoadError` with the `hf download` command to run."""
    try:
        return Path(snapshot_download(repo, allow_patterns=CONFIG_PATTERNS))
    except Exception as err:  # noqa: BLE001 - offline misses, network and auth errors all end here
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such repo"
        include = " ".join(f'"{p}"' for p in CONFIG_PATTERNS)
        raise ModelLoadError(
            f"the configs of {repo} (model_index.json, */config.json, tokenizer files) are not in the local "
            f"Hugging Face cache and {why}. On a connected machine run `hf download {repo} --include {include}` "
            f"and copy the HF cache (~/.cache/huggingface) here, or pass --config with a diffusers folder of the "
            f"same architecture. ({type(err).__name__})"
        ) from None


def single_file_source(path: str | Path, config: str | None = None) -> tuple[Family, Path]:
    """The family of checkpoint file `path` and the folder of configs to load it with.

    With `config` (a diffusers folder or hub id), its model_index.json names the family: it wins
    over a detection the file does not make sure (small test models look like "v1"), and a file
    that surely is another family is an error. Without, the family is the detected one and the
    configs are diffusers' default repo for that type. Raises `ModelLoadError` naming the file.
    """
    model_type, sure = single_file_type(path)
    try:
        detected = family_of_single_file(model_type)
    except UnknownFamily as err:
        if sure or config is None:
            raise ModelLoadError(f"{path} is {err}") from None
        detected = None
    if config is None:
        return detected, config_folder(DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"])
    where = Path(config).expanduser()
    if not where.is_dir():
        if config.count("/") != 1:
            raise ModelLoadError(f"--config {config!r} is neither a diffusers folder nor a hub repo id like 'org/name'")
        where = config_folder(config)
    try:
        family = family_of(DiffusionPipeline.load_config(str(where)).get("_class_name"))
    except (OSError, ValueError) as err:  # UnknownFamily is a ValueError
        raise ModelLoadError(f"--config {config!r} does not describe a model Stepwise runs: {err}") from None
    if sure and detected is not family:
        raise ModelLoadError(f"{path} is a {detected.label} checkpoint (diffusers calls it {model_type!r}) but "
                             f"--config {config!r} describes {family.label}; pass a --config of its architecture")
    return family, where


@dataclass(frozen=True)
class ModelEntry:
    """One loadable model of a models folder."""

    name: str  # folder or file name
    source: str  # what --model and `ModelCache.checkpoint` take
    family: Family

    @property
    def label(self) -> str:
        return f"{self.name} ({self.family.label})"


def list_models(folder: str | Path, config: str | None = None) -> tuple[list[ModelEntry], dict[str, str]]:
    """Every model in `folder`, by name: diffusers folders (subfolders with model_index.json) and
    single files (*.safetensors, *.ckpt), each checked as far as it can be without loading weights
    (a single file's header, a folder's `_class_name`). Returns the entries that look loadable and
    `{name: reason}` for the others. Other files and folders are not models and are skipped.
    Raises `ModelLoadError` when `folder` is not a readable folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"--models-dir {str(folder)!r} is not a folder")
    entries, broken = [], {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name.casefold()):
        if path.name.startswith("."):
            continue
        try:
            if path.is_dir() and (path / layout.MODEL_INDEX).is_file():
                entries.append(ModelEntry(path.name, str(path), _folder_family(path)))
            elif path.is_file() and is_single_file(path.name):
                entries.append(ModelEntry(path.name, str(path), _file_family(path, config)))
        except ModelLoadError as err:
            broken[path.name] = str(err)
    return entries, broken


def _folder_family(path: Path) -> Family:
    try:
        class_name = json.loads((path / layout.MODEL_INDEX).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"{path}: model_index.json is not a readable JSON object ({err})") from None
    try:
        return family_of(class_name)
    except UnknownFamily as err:
        raise ModelLoadError(f"{path} is {err}") from None


def _file_family(path: Path, config: str | None) -> Family:
    # the configs are found now, as on load: a file whose configs are not in the HF cache is listed
    # as broken with the download command, not offered and then refused when picked
    return single_file_source(path, config)[0]