"""Models, generation, previews and metadata. No Gradio in this package."""

from .cache import BUNDLED, ModelCache, ModelLoadError
from .generate import CancelToken, Final, Frame, GenerationError, generate
from .previews import PREVIEW_MODES, VIEWS
from .request import MODES, GenerationRequest, Limits, RequestError, validate_request
from .schedulers import SCHEDULER_NAMES

__all__ = [
    "BUNDLED", "MODES", "PREVIEW_MODES", "SCHEDULER_NAMES", "VIEWS", "CancelToken", "Final", "Frame",
    "GenerationError", "GenerationRequest", "Limits", "ModelCache", "ModelLoadError", "RequestError", "generate", "validate_request",
]
