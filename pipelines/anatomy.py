"""Looking inside a run: the prompt's tokens, the seed's starting noise, and any
step's latents as pictures (both views, and the 4 latent channels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .cache import BUNDLED, ModelCache
from .request import GenerationRequest


@dataclass(frozen=True)
class Token:
    text: str
    id: int
    kept: bool  # False: past the text encoder's limit, cut off


class Anatomy:
    """Inspection helpers bound to one model source of a cache."""

    def __init__(self, cache: ModelCache, source: str = BUNDLED):
        self.cache, self.source = cache, source

    def tokens(self, prompt: str) -> list[Token]:
        """How the text encoder sees `prompt`, start and end markers included."""
        tokenizer = self.cache.pipeline("txt2img", self.source).tokenizer
        ids = tokenizer(prompt, truncation=False).input_ids
        limit = tokenizer.model_max_length
        # truncation keeps the first limit - 1 tokens and puts the end marker last
        return [Token(tokenizer.convert_ids_to_tokens(i).replace("</w>", ""), i, n < limit - 1 or n == len(ids) - 1)
                for n, i in enumerate(ids)]

    def initial_noise(self, request: GenerationRequest) -> Image.Image:
        """txt2img's starting latent for this seed, as the pipeline draws it, through the latent->RGB map."""
        pipe = self.cache.pipeline("txt2img", self.source)
        factor = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, request.height // factor, request.width // factor)
        noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(request.seed), dtype=torch.float32)
        return self.picture(noise, "latent-rgb")

    def picture(self, latents: torch.Tensor, preview: str) -> Image.Image:
        """Latents as a picture with the given preview decoder."""
        decode = self.cache.checkpoint(self.source).decoder(preview)
        return Image.fromarray(decode(latents.to(self.cache.device)).cpu().numpy())

    def step_pictures(self, frame, preview: str) -> tuple[Image.Image, Image.Image, list[Image.Image]]:
        """A frame's x_t and x0 as pictures, and its latent channels."""
        latents = frame.latents.tensor()
        return self.picture(latents, preview), self.picture(frame.x0.tensor(), preview), self.channels(latents)

    @staticmethod
    def channels(latents: torch.Tensor) -> list[Image.Image]:
        """Each latent channel as a grayscale image, scaled to its own range."""
        images = []
        for channel in latents[0].float():
            low, high = channel.min(), channel.max()
            scaled = (channel - low) / (high - low) if high > low else torch.zeros_like(channel)
            images.append(Image.fromarray((scaled * 255).round().to(torch.uint8).cpu().numpy(), mode="L"))
        return images
