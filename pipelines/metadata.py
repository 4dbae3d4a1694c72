"""Generation settings inside images. Written: AUTOMATIC1111's "parameters" PNG text chunk,
which A1111, ComfyUI, InvokeAI and sd-parsers all read. Read: whatever sd-parsers reads
(A1111, ComfyUI, Fooocus, InvokeAI, NovelAI), mapped onto this app's request fields."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin
from sd_parsers.data import Generators, PromptInfo
from sd_parsers.exceptions import ParserError
from sd_parsers.parsers import MANAGED_PARSERS

from .choices import SCHEDULER_NAMES
from .request import FIELDS, MAX_INPUT_PIXELS, GenerationRequest, Limits, RequestError, validate_request


def a1111_parameters(req: GenerationRequest, model: str, distilled_guidance: bool = False) -> str:
    """The run's settings as AUTOMATIC1111's "parameters" text, true to what ran: without
    classifier-free guidance (guidance_scale <= 1) the negative prompt is not written, as
    it did not act, and CFG scale is 1, which every value at or below 1 acts as.
    distilled_guidance: guidance_scale was an input of the model (Flux), written as Forge
    writes it: "CFG scale: 1, Distilled CFG Scale: 3.5"."""
    cfg = req.guidance_scale if req.classifier_free_guidance and not distilled_guidance else 1.0
    fields = [
        ("Steps", req.steps),
        ("Sampler", req.scheduler),
        ("CFG scale", cfg),
        *([("Distilled CFG Scale", req.guidance_scale)] if distilled_guidance else []),
        ("Seed", req.seed),
        ("Size", f"{req.width}x{req.height}"),
        ("Model", model),
    ]
    if req.mode != "txt2img":
        fields.append(("Denoising strength", req.strength))
    lines = [req.prompt]
    if req.negative_prompt and cfg > 1:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def save_png(final, path: str | Path, model: str, distilled_guidance: bool = False) -> str:
    """Write the final image losslessly with its settings (`a1111_parameters`); return the path."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(final.request, model, distilled_guidance))
    final.image.save(path, "PNG", pnginfo=info)
    return str(path)


# ---- reading: whatever sd-parsers reads, mapped onto this app's request fields ----

# Sampler names as A1111, ComfyUI/Fooocus, InvokeAI and NovelAI write them (lower-cased), by A1111 name.
SAMPLER_ALIASES = {
    "euler a": "Euler a", "euler_ancestral": "Euler a", "euler_a": "Euler a", "k_euler_ancestral": "Euler a",
    "k_euler_a": "Euler a",
    "euler": "Euler", "k_euler": "Euler",
    "ddim": "DDIM",
    "unipc": "UniPC", "uni_pc": "UniPC",
    "plms": "PLMS", "pndm": "PLMS",
    "dpm++ 2m": "DPM++ 2M", "dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m": "DPM++ 2M",
}
# This app's schedulers as (A1111 sampler, schedule type); "even" is the checkpoint's own evenly spaced
# timesteps. PNDM with skip_prk_steps (pipelines/schedulers.py) is the PLMS sampler.
OFFERED = {("Euler a", "even"): "Euler a", ("Euler", "even"): "Euler", ("DDIM", "even"): "DDIM",
           ("UniPC", "even"): "UniPC", ("PLMS", "even"): "PNDM", ("DPM++ 2M", "karras"): "DPM++ 2M Karras",
           ("DPM++ 2M", "even"): "DPM++ 2M"}
# Schedule types that space timesteps evenly: A1111 Uniform/DDIM, ComfyUI normal/simple/sgm_uniform/ddim_uniform,
# NovelAI native. A1111's "Automatic" is the sampler's own default: Karras for DPM++ 2M (A1111 1.9+), else even.
EVEN_SCHEDULES = {"", "uniform", "ddim", "normal", "simple", "sgm_uniform", "ddim_uniform", "native"}
NO_SETTINGS = ("this image carries no generation settings that sd-parsers reads "
               "(AUTOMATIC1111, ComfyUI, Fooocus, InvokeAI or NovelAI metadata)")


@dataclass(frozen=True)
class ReadSettings:
    """Settings read from an image's metadata.

    `fields`: request fields (prompt, negative_prompt, seed, steps, guidance_scale, width,
    height, scheduler, strength) that the file holds, that map onto this app and fit its
    limits; text is never empty. `model`: the checkpoint the file names (not loaded).
    `notes`: one line for each thing in the file that was not loaded, and why.
    """

    generator: str
    fields: dict[str, Any]
    model: str | None = None
    notes: tuple[str, ...] = ()


def read_parameters(image: Image.Image | str | Path, limits: Limits = Limits(),
                    schedulers: tuple[str, ...] = SCHEDULER_NAMES) -> ReadSettings:
    """The generation settings in an image (a path or an open PIL image) as request fields.

    Reads what sd-parsers reads: A1111's PNG `parameters` chunk, JPEG/WebP EXIF UserComment or
    stealth alpha bits, Fooocus JSON, a ComfyUI graph, InvokeAI and NovelAI metadata. Values
    outside `limits` and samplers outside `schedulers` are left out with a note. Raises OSError
    for a file that is not an image and ValueError for an image without settings.
    """
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return read_parameters(opened, limits, schedulers)
    info = _parse(_metadata(image)) or _parse(_stealth(image))
    if info is None:
        raise ValueError(NO_SETTINGS)
    if not info.samplers:  # e.g. a ComfyUI graph whose sampler node has no sampler_name, steps and cfg
        raise ValueError(f"this {info.generator.value} image names no sampler that sd-parsers reads")
    found, model, notes, unused = _found(info)
    fields = _fitting(found, limits, schedulers, notes)
    if unused:
        notes.append(f"not used by this app: {', '.join(unused)}")
    return ReadSettings(info.generator.value, fields, model, tuple(notes))


def _metadata(image: Image.Image) -> dict:
    """Where the generators put their settings: PNG text chunks, or the EXIF UserComment of a
    JPEG or WebP (as sd-parsers' extractors read them, without their cache keyed on id(image),
    which hands a freed image's settings to the next image given the same id)."""
    if image.format in ("JPEG", "MPO", "WEBP"):
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        return {"parameters": _user_comment(comment)} if comment else {}
    if image.format == "PNG" and image.width * image.height <= MAX_INPUT_PIXELS:
        return dict(image.text)  # reads chunks after the pixel data too (it decodes the image)
    return dict(image.info)


STEALTH_HEADER = b"stealth_pngcomp"  # A1111's stealth_pnginfo extension, the variant sd-parsers reads


def _stealth(image: Image.Image) -> dict:
    """Settings hidden in the lowest bit of an RGBA PNG's alpha, read column by column, most
    significant bit first: the header, the payload's length in bits (32-bit big-endian), then
    gzip'd text (A1111's infotext, or NovelAI's chunks as JSON). sd-parsers reads this only at
    its EAGER level, through a list of every pixel's tuple; numpy does it in one pass."""
    if image.format != "PNG" or image.mode != "RGBA" or image.width * image.height > MAX_INPUT_PIXELS:
        return {}
    data = np.packbits((np.asarray(image.getchannel("A")) & 1).T.reshape(-1)).tobytes()
    start = len(STEALTH_HEADER) + 4
    if not data.startswith(STEALTH_HEADER):
        return {}
    length = int.from_bytes(data[start - 4:start], "big") // 8
    try:
        text = gzip.decompress(data[start:start + length]).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return {}
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError:
        decoded = None
    return decoded if isinstance(decoded, dict) else {"parameters": text}


def _user_comment(value: bytes | str) -> str:
    # EXIF UserComment: an 8-byte charset prefix, then the text. A1111 writes it with piexif's
    # UserComment.dump(..., encoding="unicode"): b"UNICODE\0" + UTF-16 big-endian.
    if isinstance(value, str):
        return value
    prefix, text = value[:8], value[8:]
    if prefix == b"UNICODE\0":
        return text.decode("utf-16-be", errors="replace")
    return text.decode("utf-8", errors="replace").rstrip("\0")


def _parse(metadata: dict) -> PromptInfo | None:
    # sd-parsers' own order: Fooocus before A1111 (both use "parameters"), then ComfyUI, InvokeAI, NovelAI.
    for parser in MANAGED_PARSERS:
        try:
            return parser().parse(metadata)
        except (ParserError, KeyError, TypeError, ValueError, AttributeError):  # not this parser's format
            continue
    return None


def _found(info: PromptInfo) -> tuple[dict[str, Any], str | None, list[str], list[str]]:
    """The request fields the file holds (raw values), the model it names, notes, and the names
    of the other settings in the file (ComfyUI: node types)."""
    comfy = info.generator == Generators.COMFYUI
    sampler, notes = info.samplers[0], []
    if len(info.samplers) > 1:
        ids = ", ".join(f"#{s.sampler_id}" for s in info.samplers)
        notes.append(f"the graph has {len(info.samplers)} samplers ({ids}); loaded sampler #{sampler.sampler_id}")
    params, meta = dict(sampler.parameters), dict(info.metadata)
    found = {
        "prompt": _prompt(sampler.prompts, "prompt", comfy, notes),
        "negative_prompt": _prompt(sampler.negative_prompts, "negative prompt", comfy, notes),
        "seed": params.pop("seed", params.pop("noise_seed", None)),
        "steps": params.pop("steps", meta.pop("steps", None)),  # NovelAI keeps steps outside the sampler
        "guidance_scale": params.pop("cfg_scale", None),
    }
    distilled = meta.pop("Distilled CFG Scale", None)  # Forge writes Flux's guidance here, with CFG scale 1
    if distilled is not None:
        found["guidance_scale"] = distilled
    schedule = params.pop("scheduler", meta.pop("noise_schedule", None))
    found["scheduler"] = _scheduler(sampler.name, schedule, notes)
    found["width"], found["height"] = _size(info, sampler, meta, notes)
    found["strength"] = _strength(params, meta, notes)
    if info.generator == Generators.AUTOMATIC1111:
        for line in _after_settings(info.raw_parameters.get("parameters", "")):
            notes.append(f"line after the settings line, not loaded: {line}")
    meta = {k: v for k, v in meta.items() if k not in ("full_prompt", "full_negative_prompt")}  # Fooocus: styled
    unused = [*params, *(f"{k} nodes" if comfy else k for k in meta)]
    return found, sampler.model.name if sampler.model else None, notes, [str(k) for k in unused]


def _prompt(prompts, label: str, comfy: bool, notes: list[str]) -> str | None:
    texts = [p for p in prompts if p.value.strip()]
    if not texts:
        notes.append(f"the file has no {label}: kept yours")
        return None
    if comfy and len(texts) > 1:  # several text nodes feed the sampler: take one, say which
        ids = ", ".join(f"#{p.prompt_id}" for p in texts)
        notes.append(f"the sampler's {label} comes from {len(texts)} text nodes ({ids}); loaded #{texts[0].prompt_id}")
        return texts[0].value
    return ", ".join(p.value for p in texts)  # legacy InvokeAI splits one prompt around its [negative] parts


def _scheduler(name: str, schedule: str | None, notes: list[str]) -> str | None:
    said = name + (f" with schedule type {schedule}" if schedule else "")
    key = name.strip().lower()
    kind = (schedule or "").strip().lower().replace(" ", "_")
    key = key.removeprefix("sample_")  # ComfyUI before 2023: "sample_euler_ancestral"
    if key.endswith(" karras"):  # A1111 before 1.9: "DPM++ 2M Karras"
        key, kind = key[: -len(" karras")], "karras"
    elif key.endswith("_k") and key[:-2] in SAMPLER_ALIASES:  # InvokeAI: "dpmpp_2m_k"
        key, kind = key[:-2], "karras"
    sampler = SAMPLER_ALIASES.get(key)
    if kind == "automatic":
        kind = "karras" if sampler == "DPM++ 2M" else ""
    offered = OFFERED.get((sampler, "even" if kind in EVEN_SCHEDULES else kind))
    if offered is None:
        notes.append(f"sampler {said} is not offered here: kept your scheduler")
    return offered


def _size(info: PromptInfo, sampler, meta: dict, notes: list[str]) -> tuple[Any, Any]:
    text = meta.pop("Size", None) or meta.pop("resolution", None)  # A1111 "512x768"; Fooocus "(512, 768)"
    if text is not None:
        numbers = re.findall(r"\d+", str(text))
        if len(numbers) == 2:
            return numbers[0], numbers[1]
        notes.append(f"size {text!r} is not a width and a height: kept yours")
    if "width" in meta and "height" in meta:  # InvokeAI, NovelAI
        return meta.pop("width"), meta.pop("height")
    if info.generator == Generators.COMFYUI:  # the latent the chosen sampler starts from
        try:
            graph = info.raw_parameters["prompt"]
            graph = json.loads(graph) if isinstance(graph, str) else graph
            latent_id = str(graph[str(sampler.sampler_id)]["inputs"]["latent_image"][0])
            size = graph[latent_id]["inputs"]["width"], graph[latent_id]["inputs"]["height"]
        except (KeyError, TypeError, IndexError, ValueError):
            return None, None
        kind = graph[latent_id].get("class_type")  # used: not among the unused nodes
        meta[kind] = [node for node in meta.get(kind, []) if node.get("id") != latent_id]
        if not meta[kind]:
            del meta[kind]
        return size
    return None, None


def _strength(params: dict, meta: dict, notes: list[str]) -> Any:
    strength = meta.pop("Denoising strength", params.pop("denoise", params.pop("strength", meta.pop("strength", None))))
    hires = [k for k in meta if str(k).startswith("Hires")]
    if strength is not None and hires:  # A1111 txt2img + hires fix: the strength is the hires pass's
        notes.append(f"denoising strength {strength} belongs to the hires pass ({', '.join(hires)}): not loaded")
        return None
    return strength


def _after_settings(text: str) -> list[str]:
    # The settings line, as sd-parsers finds it: the last line naming 3 of these keys.
    lines = text.split("\n")
    for n in range(len(lines) - 1, -1, -1):
        if sum(f"{key}:" in lines[n] for key in ("Steps", "Sampler", "CFG scale", "Seed")) >= 3:
            return [line for line in lines[n + 1:] if line.strip()]
    return []


FIELD_LABELS = {"prompt": "prompt", "negative_prompt": "negative prompt", "seed": "seed", "steps": "steps",
                "guidance_scale": "CFG scale", "width": "size", "strength": "strength"}
NUMBERS = tuple(name for name, f in FIELDS.items() if f.kind in ("int", "float"))
WHOLE_NUMBERS = tuple(name for name, f in FIELDS.items() if f.kind == "int")


def _number(value, whole: bool) -> int | float:
    # Decimal keeps 64-bit seeds exact (float would round them) and parses A1111's text values
    try:
        number = Decimal(str(value).strip())
    except ArithmeticError:
        raise ValueError("is not a number") from None
    if not whole:
        return round(float(number), 6)  # JSON's 0.8700000000000001 is the 0.87 the tool showed
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError("is not a whole number")
    return int(number)


def _fitting(found: dict[str, Any], limits: Limits, schedulers: tuple[str, ...], notes: list[str]) -> dict[str, Any]:
    """The found values that this server accepts, checked by the same `validate_request` a run
    goes through; each refused one becomes a note that names it and says why."""
    values: dict[str, Any] = {}
    for key, value in found.items():
        if value is None:
            continue
        try:
            values[key] = _number(value, key in WHOLE_NUMBERS) if key in NUMBERS else value
        except (TypeError, ValueError, ArithmeticError) as err:
            notes.append(f"{FIELD_LABELS.get(key, key)} {value!r} {err}: kept yours")
    fields: dict[str, Any] = {}
    if values.get("scheduler") is not None:
        if values["scheduler"] in schedulers:
            fields["scheduler"] = values["scheduler"]
        else:
            notes.append(f"scheduler {values['scheduler']} is not offered for this model: kept yours")
    strength = values.get("strength")
    if strength is not None and strength != 1.0:  # 1.0 is a full pass (ComfyUI txt2img's denoise): nothing to restore
        if 0.0 < strength < 1.0:
            fields["strength"] = strength
        else:
            notes.append(f"strength {strength} must be above 0 and at most 1: kept yours")
    base = {"mode": "txt2img", "prompt": "", "seed": 0, "steps": limits.min_steps, "guidance_scale": 0.0,
            "width": limits.min_side, "height": limits.min_side}
    for group in (("prompt",), ("negative_prompt",), ("seed",), ("steps",), ("guidance_scale",), ("width", "height")):
        if not all(key in values for key in group):
            continue
        given = {key: values[key] for key in group}
        try:
            validate_request({**base, **given}, limits)
        except RequestError as err:
            shown = "x".join(str(v) for v in given.values()) if len(group) == 2 else given[group[0]]
            shown = "" if group[0].endswith("prompt") else f" {shown}"
            notes.append(f"{FIELD_LABELS[group[0]]}{shown} does not fit the loaded model ({err}): kept yours")
        else:
            fields.update(given)
    return fields
