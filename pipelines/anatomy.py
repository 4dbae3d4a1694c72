"""Looking inside a run without its models: the prompt's tokens as each text encoder
of a source reads them, and the latent channels of a step. Step pictures are made
during the run (`generate.Frame`); nothing here loads weights or uses the device,
so the Inspect panel can answer while a run holds the GPU. It imports no torch
(ui/ imports it): tokenizers load through `cache` on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .layout import BUNDLED


@dataclass(frozen=True)
class Token:
    text: str
    id: int
    kept: bool  # False: past the text encoder's limit, cut off


@dataclass(frozen=True)
class Encoded:
    """The prompt as one text encoder (or several alike: SDXL's two CLIPs) reads it."""

    encoder: str  # "CLIP" or "T5", and the tokenizer attributes: "T5 (tokenizer_2)"
    limit: int  # tokens the encoder reads, end marker included
    tokens: tuple[Token, ...]  # every token of the prompt, markers included; those past `limit` not kept

    @property
    def cut(self) -> int:
        return sum(not t.kept for t in self.tokens)


def load_tokenizers(source: str = BUNDLED, config: str | None = None) -> list[tuple[str, str, object, int]]:
    """(attribute, encoder, tokenizer, tokens the encoder reads) for each text encoder of `source`'s family
    (`Family.text_tokens`: CLIP 77, T5 256 for SD 3, 512 for Flux), each tokenizer loaded on its
    own as the class model_index.json names: a few small files, no weights, no device. The limit
    is the tokenizer's `model_max_length` where that is less, as pipelines read CLIP prompts (a
    checkpoint may ship a shorter one). A single checkpoint file's come from its configs (`config`,
    as --config). Raises `ModelLoadError` (what to do) when the source cannot be read."""
    import transformers  # torch and transformers: only once a prompt is inspected
    from diffusers import DiffusionPipeline

    from .cache import ModelCache, resolve_local
    from .families import UnknownFamily, family_of
    from .protocol import ModelLoadError
    from .sources import is_single_file, single_file_source

    if is_single_file(source) and Path(source).expanduser().is_file():
        folder = single_file_source(Path(source).expanduser(), config)[1]
    else:
        folder = resolve_local(source)
    where = str(folder) if folder else source
    try:
        index = DiffusionPipeline.load_config(where)
        family = family_of(index.get("_class_name"))
        loaded = []
        for attr, limit in family.text_tokens.items():
            library, name = index.get(attr) or (None, None)
            if library != "transformers":
                raise ModelLoadError(f"{source!r} names no transformers {attr} in its model_index.json")
            tokenizer = getattr(transformers, name).from_pretrained(where, subfolder=attr)
            loaded.append((attr, family.encoder(attr), tokenizer, min(limit, tokenizer.model_max_length)))
        return loaded
    except UnknownFamily as err:
        raise ModelLoadError(f"{source!r} is {err}") from None
    except (OSError, ValueError) as err:
        raise ModelLoadError(ModelCache._load_hint(source, err, local=folder is not None)) from err


class Anatomy:
    """Token views for the app's sources: `model` runs txt2img and img2img,
    `depth_model` (default: the model) runs depth2img. Each source's tokenizers are
    loaded once, on their own (no weights), and kept by source; a single checkpoint
    file's from its configs (`config`, as --config)."""

    def __init__(self, model: str = BUNDLED, depth_model: str | None = None, config: str | None = None):
        self.config = config
        self.depth_model = depth_model
        self.sources = self.sources_for(model)
        self._tokenizers: dict[str, list] = {}
        self._lock = threading.Lock()

    def sources_for(self, model: str) -> dict[str, str]:
        """mode -> the source that runs it, with `model` the session's picked model."""
        return {"txt2img": model, "img2img": model, "depth2img": self.depth_model or model}

    def tokenizers(self, source: str) -> list[tuple[str, str, object, int]]:
        """`load_tokenizers(source)`, loaded once. Raises `ModelLoadError` when they cannot be read."""
        with self._lock:
            if source not in self._tokenizers:
                self._tokenizers[source] = load_tokenizers(source, self.config)
            return self._tokenizers[source]

    def tokens(self, prompt: str, source: str | None = None) -> list[Encoded]:
        """How each text encoder of `source` (default: the txt2img one) sees `prompt`, start and end
        markers included; encoders that read it alike (SDXL's two CLIPs) once."""
        encoded: list[Encoded] = []
        for attr, kind, tokenizer, limit in self.tokenizers(source or self.sources["txt2img"]):
            ids = tokenizer(prompt, truncation=False).input_ids
            # truncation keeps the first limit - 1 tokens and puts the end marker last (CLIP's and T5's alike)
            tokens = tuple(Token(token_text(tokenizer.convert_ids_to_tokens(i)), i, n < limit - 1 or n == len(ids) - 1)
                           for n, i in enumerate(ids))
            same = next((k for k, e in enumerate(encoded) if e.tokens == tokens and e.limit == limit), None)
            if same is None:
                encoded.append(Encoded(f"{kind} ({attr})", limit, tokens))
            else:  # the same reading: name both tokenizers on one
                encoded[same] = Encoded(encoded[same].encoder[:-1] + f", {attr})", limit, tokens)
        return encoded


def token_text(piece: str) -> str:
    """A tokenizer's piece as the word part it reads: CLIP's BPE marks a word's end with </w>,
    T5's sentencepiece a word's start with ▁."""
    return piece.replace("</w>", "").replace("\u2581", " ").strip() or piece


def channels(latents) -> list[Image.Image]:
    """Each latent channel of the first image of (B, C, h, w) `latents` (a torch tensor) as
    an 8-bit grayscale image, scaled to its own range (so x_t's scaling does not matter)."""
    images = []
    for channel in latents[0].float().cpu().numpy():
        low, high = channel.min(), channel.max()
        scaled = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
        images.append(Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L"))
    return images
