import ast
from pathlib import Path

import pytest

from pipelines import layout
from pipelines.presets import PRESET_DIR, PresetError, load_preset, load_presets

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_presets_load_one_per_pipeline_and_real_models():
    presets = load_presets()
    assert {p.mode for p in presets.values()} == {"txt2img", "img2img", "depth2img"}
    models = {p.model for p in presets.values()}
    assert {"bundled", "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-depth"} <= models


def test_micro_presets_use_the_shipped_settings():
    """The micro presets are the app's defaults: they sample as training.evaluate scored the model."""
    shipped = layout.read_card(layout.BUNDLED_FOLDER)
    micro = [p for p in load_presets().values() if p.model == "bundled"]
    assert {p.mode for p in micro} == {"txt2img", "img2img", "depth2img"}
    for p in micro:
        got = {k: p.values.get(k) for k in ("steps", "guidance_scale", "scheduler", "width", "height")}
        assert got == {k: shipped[k] for k in got}, p.name


@pytest.mark.parametrize("body,needle", [
    ('name="x"\nmode="txt2img"\nprompt="p"\nsteps=0\n', "bad.toml: field steps: must be between 1 and 150"),
    ('name="x"\nmode="txt2img"\nprompt="p"\nsampler="Euler"\n', "bad.toml: unknown field 'sampler'"),
    ('name="x"\nmode="paint"\nprompt="p"\n', "bad.toml: field 'mode' must be one of"),
    ('name="x"\nprompt="p"\n', "bad.toml: field 'mode' is missing"),
    ('name="x"\nmode="txt2img"\nprompt="p"\nwidth=100\n', "bad.toml: field width: must be a multiple of 8"),
    ('name = "x\n', "bad.toml: not valid TOML"),
])
def test_bad_preset_names_file_and_field(tmp_path, body, needle):
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(PresetError) as err:
        load_preset(tmp_path / "bad.toml")
    assert needle in str(err.value)


def test_one_bad_file_fails_the_folder(tmp_path):
    for f in PRESET_DIR.glob("*.toml"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "zz.toml").write_text('name="x"\nmode="txt2img"\nprompt="p"\nguidance_scale=99\n')
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
