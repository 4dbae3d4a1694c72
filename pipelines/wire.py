"""A run's frames as compact messages, for runs made in another process (`pipelines.workers`).

A step travels as a dict of plain values: its numbers, its pictures as PNG (lossless, so the
timeline shows the run's own pixels, as a saved run's files do) and its latent-space tensors as
one safetensors blob in their own dtypes; no pickled torch or PIL objects. The first step also
carries what a run's frames share: the noise schedule's timesteps and levels, the prompt tokens,
the latent->RGB map. A bundled-model step is about 27 kB with attention maps; the final image is
a PNG. Errors a user
can act on travel as messages too, so the front raises them with their own message.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .generate import LATENTS, PICTURE, Frame
from .outputs import png_bytes
from .previews import Deferred, HostCopy, LatentRGB, SavedSchedule, picture_like
from .protocol import Final, GenerationError, ModelLoadError
from .request import GenerationRequest

PICTURES = ("xt_pixels", "x0_pixels", "start_pixels", "depth_pixels")  # uint8 (H, W, 3)
TENSORS = ("t", "latents", "start_latents", "x0", "noise_pred", "noise_pred_text", "noise_pred_uncond", "attention")
DECODED = {PICTURE[view]: LATENTS[view] for view in PICTURE}  # each picture a run decodes, and from what
ERRORS = {cls.__name__: cls for cls in (GenerationError, ModelLoadError, ValueError)}  # raised again by name


def message(item: Frame | Final, unmade: bool = True) -> dict:
    """A frame or the final image as a message (`Reader.read` turns it back). `unmade` False leaves out the
    pictures not made yet (`HostCopy.made`; on a CPU the views a run defers) instead of decoding them now:
    their latents travel, and a `Reader` given the run's decoder makes them when first read."""
    if isinstance(item, Final):
        return {"final": png_bytes(item.image), "seconds": item.seconds, "notes": list(item.notes)}
    msg = {"step": item.step, "total": item.total, "view": item.view, "seconds": item.seconds,
           "pictures": {name: png_bytes(Image.fromarray(copy.tensor().numpy())) for name in PICTURES
                        if (copy := getattr(item, name)) is not None and (unmade or copy.made)},
           "tensors": save_tensors({name: copy.tensor().contiguous() for name in TENSORS
                                    if (copy := getattr(item, name)) is not None})}
    if item.step == 1:
        schedule, rgb = item.schedule, item.latent_rgb
        msg["run"] = {"timesteps": schedule.timesteps.tensor().double().tolist(), "levels": schedule.levels,
                      "flow_matching": schedule.flow_matching, "prediction_type": schedule.prediction_type,
                      "tokens": list(item.tokens), "latent_rgb": rgb.to_dict() if rgb is not None else None}
    return msg


def relay(items: Iterator[Frame | Final], send: Callable[[dict | None], None], unmade: bool = True) -> None:
    """Send a run's items as messages (`message`), then `None`; an error the run raised is sent as the
    last message (`error`) instead of raised. The run's thread in another process calls it."""
    try:
        for item in items:
            send(message(item, unmade))
    except Exception as err:  # noqa: BLE001 - goes to the front as a message
        send(error(err))
    finally:
        send(None)


def error(err: Exception) -> dict:
    """An error as a message: GenerationError, ModelLoadError and ValueError keep their kind."""
    return {"error": type(err).__name__ if type(err).__name__ in ERRORS else "GenerationError",
            "message": str(err) if type(err).__name__ in ERRORS else f"the worker failed: {type(err).__name__}: {err}"}


class Reader:
    """Turns one run's messages back into `Frame`s and its `Final`, in the order they were made.
    Raises the error a message carries (GenerationError, ModelLoadError, ValueError). A picture a
    message left out (`message(unmade=False)`) is made from its latents by `decode` (the run's preview
    decoder: latents (1, C, h, w) -> uint8 (H, W, 3)) when first read (`Deferred`)."""

    def __init__(self, request: GenerationRequest, source: str,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.request, self.source, self.decode = request, source, decode
        self.schedule: SavedSchedule | None = None
        self.tokens: tuple[str, ...] = ()
        self.latent_rgb: LatentRGB | None = None
        self._like: torch.Tensor | None = None  # the shape and dtype of the run's pictures

    def read(self, msg: dict) -> Frame | Final:
        if "error" in msg:
            raise ERRORS[msg["error"]](msg["message"])
        if "final" in msg:
            return Final(_image(msg["final"]), self.request, self.source, msg["seconds"], tuple(msg["notes"]))
        if "run" in msg:
            run = msg["run"]
            self.schedule = SavedSchedule(run["timesteps"], run["levels"], run["flow_matching"],
                                          run["prediction_type"])
            self.tokens = tuple(run["tokens"])
            self.latent_rgb = LatentRGB.from_dict(run["latent_rgb"]) if run["latent_rgb"] else None
        copies = {name: HostCopy(tensor) for name, tensor in load_tensors(msg["tensors"]).items()}
        copies |= {name: HostCopy(torch.from_numpy(np.array(_image(png)))) for name, png in msg["pictures"].items()}
        if self._like is None:  # a decoded picture (not the depth map), or the size the decoder makes
            self._like = next((copies[name].tensor() for name in DECODED if name in msg["pictures"]), None)
        for name, latents in DECODED.items():
            if name not in copies and latents in copies and self.decode is not None:
                if self._like is None:  # a run that made no picture
                    self._like = picture_like(self.decode, copies[latents].tensor())
                slot = torch.empty_like(self._like)
                copies[name] = HostCopy(slot, Deferred(lambda t=copies[latents]: self.decode(t.tensor()), slot))
        return Frame(step=msg["step"], total=msg["total"], view=msg["view"], seconds=msg["seconds"],
                     schedule=self.schedule, tokens=self.tokens, latent_rgb=self.latent_rgb, **copies)


def _image(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image
