"""The depth a depth-conditioned run sees: an uploaded map, or one a transformers estimator makes.

SD 2-depth takes the depth map itself (`depth_map=`, which the pipeline scales); the ControlNet and
FLUX.1-Depth-dev routes take an RGB depth picture (`control_image=`), made here the way diffusers'
depth ControlNet docs make one: the depth resized bicubically to the run's size, min-max scaled to
[0, 1] (near = light, as DPT / Depth Anything predict it), the same grey in R, G and B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForDepthEstimation


def control_image(depth: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(H0, W0) depth, near = larger, any range -> (1, 3, height, width) float32 in [0, 1].
    Raises ValueError for a flat map (request.py refuses flat uploads first)."""
    depth = F.interpolate(depth.float()[None, None], size=(height, width), mode="bicubic", align_corners=False)
    low, high = depth.amin(), depth.amax()
    if high <= low:
        raise ValueError("the depth map is flat (one value everywhere)")
    return ((depth - low) / (high - low)).expand(-1, 3, -1, -1).cpu()


@dataclass
class DepthEstimator:
    """A transformers depth model (DPT, Depth Anything) and its image processor."""

    model: torch.nn.Module
    processor: object

    @classmethod
    def load(cls, source: str, dtype: torch.dtype, device: torch.device) -> DepthEstimator:
        """From a folder or hub id holding both (`AutoModelForDepthEstimation`, `AutoImageProcessor`).
        Raises OSError / ValueError as transformers does."""
        model = AutoModelForDepthEstimation.from_pretrained(source, dtype=dtype).to(device).eval()
        return cls(model, AutoImageProcessor.from_pretrained(source))

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The predicted depth of `image`, (h, w) float32 at the model's own size, near = larger."""
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixel_values).predicted_depth[0].float()

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.model]
