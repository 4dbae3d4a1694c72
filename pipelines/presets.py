"""Named parameter sets, one TOML file each in presets/, validated on load."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .request import FIELDS, MODES, Limits, RequestError, validate_request

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
# fields a preset may set beyond the request's own
_META = {"name", "description", "model"}
_REQUEST_FIELDS = {"mode"} | {f.name for f in FIELDS.values() if f.kind != "image"}


class PresetError(ValueError):
    """A preset file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Preset:
    name: str  # file stem, what --preset takes
    title: str
    description: str
    model: str  # the checkpoint the preset was tuned for
    values: dict[str, Any]  # request fields

    @property
    def mode(self) -> str:
        return self.values["mode"]


def load_preset(path: Path, limits: Limits = Limits()) -> Preset:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise PresetError(f"{path.name}: not valid TOML ({err})") from None
    unknown = set(data) - _META - _REQUEST_FIELDS
    if unknown:
        raise PresetError(f"{path.name}: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_META | _REQUEST_FIELDS))}")
    for required in ("name", "mode", "prompt"):
        if required not in data:
            raise PresetError(f"{path.name}: field {required!r} is missing")
    if data["mode"] not in MODES:
        raise PresetError(f"{path.name}: field 'mode' must be one of {', '.join(MODES)}, got {data['mode']!r}")
    values = {k: v for k, v in data.items() if k in _REQUEST_FIELDS}
    try:
        _validate(values, limits)
    except RequestError as err:
        raise PresetError(f"{path.name}: field {err}") from None
    return Preset(
        name=path.stem,
        title=str(data["name"]),
        description=str(data.get("description", "")),
        model=str(data.get("model", "bundled")),
        values=values,
    )


def load_presets(folder: Path = PRESET_DIR, limits: Limits = Limits()) -> dict[str, Preset]:
    """Every preset in `folder`, by file stem, sorted. A bad file fails loudly."""
    return {p.name: p for p in (load_preset(f, limits) for f in sorted(folder.glob("*.toml")))}


def fitting_presets(presets: dict[str, Preset], limits: Limits, native_side: int) -> dict[str, Preset]:
    """The presets worth offering on a checkpoint: their settings pass its `limits`, and their
    image is at least half its native side (SD 1.5 at 64 px, or the 64 px micro model at
    512 px, draws noise for minutes)."""
    def fits(preset: Preset) -> bool:
        values = preset.values
        side = max(values.get("width", native_side), values.get("height", native_side))
        try:
            _validate(values, limits)
        except RequestError:
            return False
        return side >= native_side // 2

    return {name: p for name, p in presets.items() if fits(p)}


def _validate(values: dict[str, Any], limits: Limits) -> None:
    """validate_request on a preset's values; raises RequestError."""
    validate_request(dict(values, image=Image.new("RGB", (8, 8))), limits)  # image modes need one to validate the rest
