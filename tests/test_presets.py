import ast
import dataclasses
from pathlib import Path

import pytest

from pipelines import ModelCache, layout
from pipelines.presets import PRESET_DIR, PresetError, fitting_presets, load_preset, load_presets

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_presets_load_one_per_pipeline_and_real_models():
    presets = load_presets()
    assert {p.mode for p in presets.values()} == {"txt2img", "img2img", "depth2img"}
    models = {p.model for p in presets.values()}
    assert {"bundled", "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-depth"} <= models


# the checkpoint each family's shipped presets expect, and the settings from its model card
NEW_PRESETS = {
    "sdxl-txt2img": ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 30, 6.0, ""),
    "sd35-large-txt2img": ("sd3", "stabilityai/stable-diffusion-3.5-large", 28, 3.5, ""),
    "sd35-medium-txt2img": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 40, 4.5, ""),
    "flux-dev-txt2img": ("flux", "black-forest-labs/FLUX.1-dev", 28, 3.5, None),
    "flux-schnell-txt2img": ("flux", "black-forest-labs/FLUX.1-schnell", 4, 0.0, None),
}


def test_family_presets_name_their_checkpoint_and_published_settings():
    presets = load_presets()
    for name, (family, model, steps, guidance, _) in NEW_PRESETS.items():
        p = presets[name]
        assert (p.family, p.model, p.mode) == (family, model, "txt2img"), name
        assert (p.values["steps"], p.values["guidance_scale"]) == (steps, guidance), name
        assert (p.values["width"], p.values["height"], p.values["scheduler"]) == (1024, 1024, "Euler"), name
        assert model in p.description, name
    assert "negative_prompt" not in presets["flux-dev-txt2img"].values
    assert "ignores guidance" in presets["flux-schnell-txt2img"].description


def full_size_limits(folder) -> dict:
    """A tiny checkpoint's Limits (family, scheduler menu, negative prompt, preview decoders) with the
    sizes of its full-size family (1024 px native), as fitting_presets sees a real checkpoint."""
    limits = ModelCache(device="cpu").checkpoint(str(folder)).limits()
    return dict(limits=dataclasses.replace(limits, min_side=128, max_side=2048, max_pixels=4 * 1024 * 1024),
                native_side=1024)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_presets_are_offered_only_on_their_family(tiny_families, family):
    offered = fitting_presets(load_presets(), **full_size_limits(tiny_families(family)))
    assert {p.family for p in offered.values()} == {family}
    expected = {name for name, (f, *_) in NEW_PRESETS.items() if f == family}
    assert expected <= set(offered)
    assert not {name for name in NEW_PRESETS if name not in expected} & set(offered)


def test_sd_presets_still_fit_sd_checkpoints(tiny_dir):
    limits = ModelCache(device="cpu").checkpoint(str(tiny_dir)).limits()
    sd15 = fitting_presets(load_presets(), dataclasses.replace(limits, max_side=2048, max_pixels=4 * 512 * 512), 512)
    assert set(sd15) == {"sd15-txt2img", "sd15-img2img", "sd2-depth"}


def test_micro_presets_use_the_shipped_settings():
    """The micro presets are the app's defaults: they sample as training.evaluate scored the model."""
    shipped = layout.read_card(layout.BUNDLED_FOLDER)
    micro = [p for p in load_presets().values() if p.model == "bundled"]
    assert {p.mode for p in micro} == {"txt2img", "img2img", "depth2img"}
    for p in micro:
        got = {k: p.values.get(k) for k in ("steps", "guidance_scale", "scheduler", "width", "height")}
        assert got == {k: shipped[k] for k in got}, p.name


@pytest.mark.parametrize("body,needle", [
    ('name="x"\nfamily="sd"\nmode="txt2img"\nprompt="p"\nsteps=0\n', "bad.toml: field steps: must be between 1 and 150"),
    ('name="x"\nfamily="sd"\nmode="txt2img"\nprompt="p"\nsampler="Euler"\n', "bad.toml: unknown field 'sampler'"),
    ('name="x"\nfamily="sd"\nmode="paint"\nprompt="p"\n', "bad.toml: field 'mode' must be one of"),
    ('name="x"\nfamily="sd"\nprompt="p"\n', "bad.toml: field 'mode' is missing"),
    ('name="x"\nmode="txt2img"\nprompt="p"\n', "bad.toml: field 'family' is missing"),
    ('name="x"\nfamily="sdxl"\nmode="txt2img"\nprompt="p"\nwidth=100\n', "bad.toml: field width: must be a multiple of 8"),
    ('name = "x\n', "bad.toml: not valid TOML"),
    ('name="x"\nfamily="flux2"\nmode="txt2img"\nprompt="p"\n',
     "bad.toml: field 'family' must be one of sd, sd-depth, sdxl, sd3, flux, flux-depth, got 'flux2'"),
    # a flow-matching family runs only flow-matching samplers
    ('name="x"\nfamily="sd3"\nmode="txt2img"\nprompt="p"\nscheduler="DPM++ 2M"\n',
     "bad.toml: field scheduler: DPM++ 2M is not offered for this model in txt2img: DPM++ 2M is a sampler for "
     "noise-prediction models; this model is trained for flow matching, which runs with Euler; choose one of Euler"),
    ('name="x"\nfamily="flux"\nmode="img2img"\nprompt="p"\nscheduler="Euler a"\n',
     "bad.toml: field scheduler: Euler a is not offered for this model in img2img"),
    # a setting the run would drop is an error in a preset
    ('name="x"\nfamily="flux"\nmode="txt2img"\nprompt="p"\nscheduler="Euler"\nnegative_prompt="blurry"\n',
     "bad.toml: field negative_prompt: not used: Flux.1 has no negative conditioning"),
    ('name="x"\nfamily="sd"\nmode="txt2img"\nprompt="p"\nguidance_scale=1.0\nnegative_prompt="blurry"\n',
     "bad.toml: field negative_prompt: not used: guidance_scale 1.0 turns classifier-free guidance off"),
])
def test_bad_preset_names_file_and_field(tmp_path, body, needle):
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(PresetError) as err:
        load_preset(tmp_path / "bad.toml")
    assert needle in str(err.value)


def test_one_bad_file_fails_the_folder(tmp_path):
    for f in PRESET_DIR.glob("*.toml"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "zz.toml").write_text('name="x"\nfamily="sd"\nmode="txt2img"\nprompt="p"\nguidance_scale=99\n')
    with pytest.raises(PresetError, match="zz.toml: field guidance_scale"):
        load_presets(tmp_path)


def imports(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_layers_stay_apart():
    assert "gradio" not in imports("pipelines")  # no Gradio in pipelines/
    assert "torch" not in imports("ui")  # no torch in ui/
