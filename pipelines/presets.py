"""Named parameter sets, one TOML file each in presets/, validated on load.

A preset names the model family its settings are for (`family`: a `families.FAMILIES` name)
and is offered only on a checkpoint of that family. This module imports no torch: ui/ reads
`Preset`; the family table is imported when presets load.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .request import FIELDS, MODES, Limits, RequestError, validate_request

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
# fields a preset may set beyond the request's own
_META = {"name", "description", "model", "family"}
_REQUEST_FIELDS = {"mode"} | {f.name for f in FIELDS.values() if f.kind != "image"}


class PresetError(ValueError):
    """A preset file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Preset:
    name: str  # file stem, what --preset takes
    title: str
    description: str
    model: str  # the checkpoint the preset was tuned for
    family: str  # the `Family.name` of that checkpoint: "sd", "sdxl", "sd3", "flux"
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
    for required in ("name", "family", "mode", "prompt"):
        if required not in data:
            raise PresetError(f"{path.name}: field {required!r} is missing")
    if data["mode"] not in MODES:
        raise PresetError(f"{path.name}: field 'mode' must be one of {', '.join(MODES)}, got {data['mode']!r}")
    family = _families().get(data["family"])
    if family is None:
        raise PresetError(f"{path.name}: field 'family' must be one of {', '.join(_families())}, "
                          f"got {data['family']!r}")
    values = {k: v for k, v in data.items() if k in _REQUEST_FIELDS}
    try:
        notes = _validate(values, _family_limits(family, limits))
    except RequestError as err:
        raise PresetError(f"{path.name}: field {err}") from None
    if notes:  # a setting that would be changed or ignored: the preset does not run as written
        raise PresetError(f"{path.name}: field {notes[0]}")
    return Preset(
        name=path.stem,
        title=str(data["name"]),
        description=str(data.get("description", "")),
        model=str(data.get("model", "bundled")),
        family=family.name,
        values=values,
    )


def load_presets(folder: Path = PRESET_DIR, limits: Limits = Limits()) -> dict[str, Preset]:
    """Every preset in `folder`, by file stem, sorted. A bad file fails loudly."""
    return {p.name: p for p in (load_preset(f, limits) for f in sorted(folder.glob("*.toml")))}


def fitting_presets(presets: dict[str, Preset], limits: Limits, native_side: int) -> dict[str, Preset]:
    """The presets worth offering on a checkpoint: made for its family (`limits.family`, the
    family's label), their settings pass its `limits`, and their image is at least half its
    native side (SD 1.5 at 64 px, or the 64 px micro model at 512 px, draws noise for minutes)."""
    def fits(preset: Preset) -> bool:
        if _families()[preset.family].label != limits.family:
            return False
        values = preset.values
        side = max(values.get("width", native_side), values.get("height", native_side))
        try:
            _validate(values, limits)
        except RequestError:
            return False
        return side >= native_side // 2

    return {name: p for name, p in presets.items() if fits(p)}


def _validate(values: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    """validate_request on a preset's values; its notes. Raises RequestError."""
    # image modes need an image to validate the rest: one of the preset's size, so that it needs no resize note
    size = (values.get("width", FIELDS["width"].default), values.get("height", FIELDS["height"].default))
    image = Image.new("RGB", size if all(isinstance(v, int) and v > 0 for v in size) else (8, 8))
    return validate_request(dict(values, image=image), limits).notes


def _families() -> dict:
    """`families.FAMILIES` by name."""
    from .families import FAMILIES  # imports torch: only where presets load, never for ui/'s `Preset`

    return {f.name: f for f in FAMILIES}


def _family_limits(family, limits: Limits) -> Limits:
    """`limits` with what the preset's family fixes before any checkpoint loads: its label, whether it
    takes a negative prompt, and for flow matching the scheduler menu (the noise-prediction samplers do
    not fit any flow-matching checkpoint; for the others fit depends on the checkpoint's schedule)."""
    from .schedulers import scheduler_menu

    limits = dataclasses.replace(limits, family=family.label, negative_prompt=family.negative_prompt)
    if not family.flow_matching:
        return limits
    menus = {mode: scheduler_menu({}, mode, flow_matching=True) for mode in MODES}
    return dataclasses.replace(limits, schedulers=menus["txt2img"][0],
                               unfit_schedulers={mode: unfit for mode, (_, unfit) in menus.items()})
