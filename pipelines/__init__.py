"""Models, generation, previews and metadata. No Gradio in this package.

Each public name is imported from its module on first use (PEP 562), so that
`from pipelines import Limits` loads only the plain modules: ui/ uses this
package without pulling in torch, diffusers or transformers.
"""

import importlib
import sys
import types

_WHERE = {
    "BUNDLED": "layout", "PREVIEW_MODES": "choices", "SCHEDULER_NAMES": "choices", "VIEWS": "choices",
    "MODES": "request", "GenerationRequest": "request", "Limits": "request", "RequestError": "request",
    "validate_request": "request",
    "CancelToken": "protocol", "Final": "protocol", "GenerationError": "protocol", "ModelLoadError": "protocol",
    "ModelCache": "cache", "Frame": "generate", "generate": "generate",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Package(types.ModuleType):
    # `generate` names a submodule and its function. Loading the submodule sets the package's
    # attribute to the module (whoever loads it first), so the attribute always gives the function.
    @property
    def generate(self):
        return importlib.import_module(".generate", __name__).generate

    @generate.setter
    def generate(self, module):
        pass


sys.modules[__name__].__class__ = _Package
