"""What importing loads and builds, each in a fresh interpreter (this one has torch already):
ui/ and the plain names of `pipelines` load no model library; `import app` builds nothing;
the bundled folder's layout is spelled only in pipelines/layout.py."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import layout

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers")


def run_fresh(code: str, **env: str) -> str:
    """Run `code` in a new interpreter at the repo root; its stdout. Fails the test on an error."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_ui_and_the_plain_pipeline_names_load_no_model_library():
    loaded = run_fresh(
        "import sys\n"
        "import ui, ui.layout, ui.events, ui.stream, ui.inspect, ui.fields, ui.history, pipelines.outputs\n"
        "from pipelines import (BUNDLED, MODES, PREVIEW_MODES, SCHEDULER_NAMES, VIEWS, CancelToken, Final,\n"
        "    GenerationError, GenerationRequest, Limits, ModelLoadError, RequestError, validate_request)\n"
        "from pipelines import layout\n"
        "validate_request({'mode': 'txt2img', 'prompt': 'x', 'width': 64, 'height': 64}, Limits())\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert loaded == "[]"


def test_the_heavy_names_still_load_on_first_use():
    out = run_fresh(
        "import sys, types\n"
        "import pipelines.generate\n"  # the submodule first: the package attribute is still the function
        "import pipelines\n"
        "from pipelines import Frame, ModelCache, generate\n"
        "from pipelines.cache import ModelLoadError\n"
        "assert not isinstance(generate, types.ModuleType) and pipelines.generate is generate\n"
        "print(generate.__module__, Frame.__module__, ModelCache.__module__, ModelLoadError is pipelines.ModelLoadError)"
    )
    assert out == "pipelines.generate pipelines.generate pipelines.cache True"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        import pipelines

        pipelines.nothing  # noqa: B018


def test_scheduler_names_are_the_scheduler_table_keys():
    from pipelines.choices import SCHEDULER_NAMES
    from pipelines.schedulers import SCHEDULERS

    assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def test_importing_app_builds_nothing_and_the_one_process_app_never_imports_ray(tmp_path, tiny_dir):
    """No model, no cache, no UI, no untrained default folder, torch's thread count untouched; then the app
    built to serve in one process (no --workers) has still not imported ray (pipelines.workers)."""
    out = run_fresh(
        "import sys\n"
        "import torch\n"
        "threads = torch.get_num_threads()\n"
        "import gradio as gr\n"
        "import app\n"
        "from pipelines import ModelCache\n"
        "built = [k for k, v in vars(app).items() if isinstance(v, (gr.Blocks, ModelCache))]\n"
        "print(built, torch.get_num_threads() == threads)\n"
        f"app.create_demo(app.parse_args(['--model', {str(tiny_dir)!r}, '--no-save']), ModelCache(device='cpu'))\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))",
        STEPWISE_CACHE=str(tmp_path),
    )
    assert out.splitlines() == ["[] True", "[]"]
    assert list(tmp_path.iterdir()) == []


def test_the_tiny_checkpoint_has_the_bundled_layout(tiny_dir):
    assert layout.is_pipeline(tiny_dir) and layout.has_depth(tiny_dir) and layout.is_untrained(tiny_dir)
    assert layout.tiny_vae_folder(tiny_dir) == tiny_dir / layout.TINY_VAE
    assert (tiny_dir / layout.DEPTH_ESTIMATOR / "preprocessor_config.json").is_file()
    assert layout.read_latent_rgb(tiny_dir) is None and layout.read_card(tiny_dir) == {}


def test_the_bundled_model_has_the_bundled_layout():
    folder = layout.BUNDLED_FOLDER
    assert layout.is_pipeline(folder) and layout.has_depth(folder) and not layout.is_untrained(folder)
    assert (folder / layout.DEPTH_ESTIMATOR / "preprocessor_config.json").is_file()
    rgb = layout.read_latent_rgb(folder)
    assert len(rgb["matrix"]) == 4 and all(len(row) == 3 for row in rgb["matrix"]) and len(rgb["bias"]) == 3
    assert layout.read_card(folder)["width"] == 128


def _layout_paths(tree: ast.AST) -> list[int]:
    """Lines that join a layout name onto a path by hand: `folder / "depth_unet"`, f"{model}/depth_unet"."""
    names = {layout.MODEL_INDEX, layout.DEPTH_UNET, layout.DEPTH_ESTIMATOR, layout.TINY_VAE, layout.LATENT_RGB,
             layout.CARD, layout.UNTRAINED, layout.CONTACT_SHEET}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            if node.right.value in names:
                lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if any(f"/{name}" in text for name in names):
                lines.append(node.lineno)
    return lines


def test_only_layout_spells_the_bundled_folder():
    spelled = {}
    for path in sorted(ROOT.glob("**/*.py")):
        if ".venv" in path.parts or path == ROOT / "pipelines" / "layout.py":
            continue
        if lines := _layout_paths(ast.parse(path.read_text(), str(path))):
            spelled[str(path.relative_to(ROOT))] = lines
    assert spelled == {}, "use pipelines/layout.py's names and helpers"
