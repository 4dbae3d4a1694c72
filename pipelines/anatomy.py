"""Looking inside a run without its models: the prompt's tokens as each source's
tokenizer reads them, and the latent channels of a step. Step pictures are made
during the run (`generate.Frame`); nothing here loads weights or uses the device,
so the Inspect panel can answer while a run holds the GPU. It imports no torch
(ui/ imports it): tokenizers load through `cache` on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .layout import BUNDLED


@dataclass(frozen=True)
class Token:
    text: str
    id: int
    kept: bool  # False: past the text encoder's limit, cut off


class Anatomy:
    """Token views for the app's sources: `model` runs txt2img and img2img,
    `depth_model` (default: `model`) runs depth2img. Each source's tokenizer is
    loaded once, on its own (no weights), and kept by source; a single checkpoint
    file's from its configs (`config`, as --config)."""

    def __init__(self, model: str = BUNDLED, depth_model: str | None = None, config: str | None = None):
        self.config = config
        self.sources = {"txt2img": model, "img2img": model, "depth2img": depth_model or model}
        self._tokenizers: dict[str, object] = {}
        self._lock = threading.Lock()

    def tokenizer(self, source: str):
        """`source`'s tokenizer. Raises `ModelLoadError` when it cannot be read."""
        with self._lock:
            if source not in self._tokenizers:
                from .cache import load_tokenizer  # torch and transformers: only once a prompt is inspected

                self._tokenizers[source] = load_tokenizer(source, self.config)
            return self._tokenizers[source]

    def tokens(self, prompt: str, source: str | None = None) -> list[Token]:
        """How `source`'s text encoder (default: the txt2img one) sees `prompt`, start and end markers included."""
        tokenizer = self.tokenizer(source or self.sources["txt2img"])
        ids = tokenizer(prompt, truncation=False).input_ids
        limit = tokenizer.model_max_length
        # truncation keeps the first limit - 1 tokens and puts the end marker last
        return [Token(tokenizer.convert_ids_to_tokens(i).replace("</w>", ""), i, n < limit - 1 or n == len(ids) - 1)
                for n, i in enumerate(ids)]


def channels(latents) -> list[Image.Image]:
    """Each latent channel of the first image of (B, C, h, w) `latents` (a torch tensor) as
    an 8-bit grayscale image, scaled to its own range (so x_t's scaling does not matter)."""
    images = []
    for channel in latents[0].float().cpu().numpy():
        low, high = channel.min(), channel.max()
        scaled = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
        images.append(Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L"))
    return images
