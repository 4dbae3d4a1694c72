"""What a new user meets first: the controls, presets and defaults fit the loaded model."""

import shutil

import gradio as gr
import pytest

import app as app_module
from pipelines import ModelCache, RequestError, layout, validate_request
from pipelines.presets import load_presets


def component(demo, elem_id=None, label=None):
    for block in demo.blocks.values():
        if (elem_id and getattr(block, "elem_id", None) == elem_id) or (label and getattr(block, "label", None) == label):
            return block
    raise KeyError(elem_id or label)


@pytest.fixture(scope="module")
def no_tiny_vae_dir(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain") / "ckpt"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns(layout.TINY_VAE))
    return folder


def demo_for(model, *flags):
    return app_module.create_demo(app_module.parse_args(["--model", str(model), *flags]), ModelCache(device="cpu"))


def test_limits_follow_the_model(tiny_dir):
    checkpoint = ModelCache(device="cpu").checkpoint(str(tiny_dir))
    assert checkpoint.native_side == 32  # UNet sample_size 16 x VAE factor 2
    limits = checkpoint.limits()
    assert (limits.min_side, limits.max_side, limits.max_pixels) == (16, 128, 4096)
    demo = demo_for(tiny_dir)
    assert (component(demo, label="Width").minimum, component(demo, label="Width").maximum) == (16, 128)
    assert component(demo, label="Height").maximum == 128


def test_bundled_limits_and_presets():
    checkpoint = ModelCache(device="cpu").checkpoint("bundled")
    assert checkpoint.native_side == 128 and checkpoint.limits().max_side == 512
    demo = demo_for("bundled")
    offered = {value for _, value in component(demo, label="Preset").choices}
    # no 512x512 SD presets on a 128 px model (at most 4x its pixels: 256x256)
    assert offered == {"micro-txt2img", "micro-img2img", "micro-depth2img"}


def test_presets_that_do_not_fit_are_not_offered_or_taken(tiny_dir):
    fitting = app_module.fitting_presets(load_presets(), ModelCache(device="cpu").checkpoint(str(tiny_dir)).limits(), 32)
    assert not any(name.startswith("sd") for name in fitting)
    with pytest.raises(app_module.PresetError, match="--preset 'sd15-txt2img' is unknown or does not fit"):
        demo_for(tiny_dir, "--preset", "sd15-txt2img")


def test_default_view_shows_the_picture_forming():
    # the micro model's full VAE costs about one step and runs on the decode thread: x0 through it
    demo = demo_for("bundled")
    assert component(demo, label="Preview decoder").value == "full-vae"
    assert component(demo, label="View").value == "x0"
    for label in ("Preview decoder", "View"):  # each choice explained in one line under the control
        control = component(demo, label=label)
        explained = [part.split(":")[0] for part in control.info.split(" · ")]
        assert explained == [value for _, value in control.choices], (label, control.info)


def test_a_model_with_no_preset_starts_at_its_own_size_with_its_tiny_vae(tiny_dir):
    # the tiny model is 32 px: the micro presets (64 px) still fit; take the model's own start values
    defaults = app_module._model_defaults(ModelCache(device="cpu").checkpoint(str(tiny_dir)), {})
    assert defaults == {"width": 32, "height": 32, "view": "x0", "preview": "tiny-vae", "steps": 20,
                        "guidance_scale": 7.5, "scheduler": "Euler a"}  # the SD family's start values


def test_each_family_starts_with_its_own_steps_guidance_and_euler(tiny_families):
    cache = ModelCache(device="cpu")
    starts = {family: app_module._model_defaults(cache.checkpoint(str(tiny_families(family))), {})
              for family in ("sdxl", "sd3", "flux")}
    assert {f: (d["steps"], d["guidance_scale"], d["scheduler"]) for f, d in starts.items()} == {
        "sdxl": (30, 5.0, "Euler"), "sd3": (28, 7.0, "Euler"), "flux": (28, 3.5, "Euler")}


def test_tiny_vae_is_offered_only_when_configured(tiny_dir, no_tiny_vae_dir):
    offered = [value for _, value in component(demo_for(tiny_dir), label="Preview decoder").choices]
    assert offered == ["latent-rgb", "tiny-vae", "full-vae"]
    plain = demo_for(no_tiny_vae_dir)
    assert [value for _, value in component(plain, label="Preview decoder").choices] == ["latent-rgb", "full-vae"]
    assert "tiny-vae" not in component(plain, label="Preview decoder").info  # nor explained
    limits = ModelCache(device="cpu").checkpoint(str(no_tiny_vae_dir)).limits()
    with pytest.raises(RequestError, match="preview: unknown value 'tiny-vae'; choose one of latent-rgb, full-vae"):
        validate_request({"mode": "txt2img", "prompt": "p", "width": 32, "height": 32, "preview": "tiny-vae"}, limits)


def test_controls_use_no_emoji_and_stop_is_small(tiny_dir):
    demo = demo_for(tiny_dir)
    for elem_id in ("seed-random", "seed-reuse", "stop"):
        button = component(demo, elem_id=elem_id)
        assert all(ord(c) < 0x2000 for c in button.value), button.value
    assert component(demo, elem_id="stop").size == "sm"
    assert "step 0/0" not in component(demo, elem_id="status").value


def test_importing_app_builds_nothing():
    import importlib
    import sys

    sys.modules.pop("app", None)
    module = importlib.import_module("app")
    assert not any(isinstance(v, (gr.Blocks, ModelCache)) for v in vars(module).values())


def test_the_readme_client_example_runs_as_written(tmp_path, monkeypatch):
    """On the bundled model, as `python app.py` serves it: the example's sizes are the bundled model's."""
    from pathlib import Path

    from .test_app import free_port

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### From scripts"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    demo = demo_for("bundled")
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    try:
        monkeypatch.chdir(tmp_path)
        scope: dict = {}
        exec(code.replace("http://127.0.0.1:7860/", demo.local_url), scope)  # noqa: S102 - our own README
    finally:
        demo.close()
    assert scope["final"]["url"].endswith("final.png") and (tmp_path / "final.png").stat().st_size > 0
    assert scope["preview"]["url"].endswith("step_0020.jpg")  # the last step's frame came before the final update
    assert len(scope["job"].outputs()) <= 21 and len(scope["gallery"]) == 20  # as the README says
    # the notebook snippet, on the file the example downloaded
    after = section[section.index("safetensors` (N steps"):]
    notebook = after[after.index("```python\n") + len("```python\n"):after.index("```\n", after.index("```python"))]
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        exec(notebook, scope)  # noqa: S102 - our own README
    run, tokens = scope["run"], scope["tokens"]
    n, c, h, w = run["x0"].shape
    assert n == 20 and run["latents"].shape == (21, c, h, w) and run["attention"].shape == (20, len(tokens), h, w)
    assert tokens == ["a", "red", "circle", "on", "the", "left", ",", "blue", "background"]
    assert scope["g"] == 3.0  # the example's guidance_scale


def test_set_up_is_two_commands_and_ci_runs_the_second():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    commands = readme[readme.index("## Install, run, test"):].split("```bash\n")[1].split("```")[0]
    assert [line.split()[0] for line in commands.splitlines()] == ["scripts/run.sh", "scripts/test.sh",
                                                                   "scripts/test.sh"]  # the last: -m slow
    for script in ("scripts/run.sh", "scripts/test.sh"):
        assert (root / script).stat().st_mode & 0o111, f"{script} is not executable"
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "scripts/test.sh"
    # the CPU-only choice: the scripts install torch from STEPWISE_TORCH_INDEX when it is set
    assert '${STEPWISE_TORCH_INDEX:+--index-url "$STEPWISE_TORCH_INDEX"}' in (root / "scripts" / "env.sh").read_text()


def test_the_scheduler_menu_and_validation_follow_the_model():
    limits = ModelCache(device="cpu").checkpoint("bundled").limits()  # zero terminal SNR, v-prediction
    assert limits.schedulers == ("DDIM", "Euler", "Euler a", "DPM++ 2M", "UniPC")
    demo = demo_for("bundled")
    dropdown = component(demo, label="Scheduler")
    assert [value for _, value in dropdown.choices] == list(limits.schedulers)
    assert "DPM++ 2M Karras: Karras sigmas do not fit a zero-terminal-SNR schedule" in dropdown.info
    raw = {"mode": "txt2img", "prompt": "p", "width": 64, "height": 64, "scheduler": "DPM++ 2M Karras"}
    with pytest.raises(RequestError, match=r"^scheduler: DPM\+\+ 2M Karras is not offered for this model in txt2img: "
                                           r"Karras sigmas .*; choose one of DDIM, Euler, Euler a, DPM\+\+ 2M, UniPC$"):
        validate_request(raw, limits)


def test_pndm_is_offered_for_txt2img_but_refused_for_img2img(tiny_dir, scene):
    limits = ModelCache(device="cpu").checkpoint(str(tiny_dir)).limits()  # SD's schedule: every sampler fits
    raw = {"prompt": "p", "width": 32, "height": 32, "scheduler": "PNDM", "image": scene}
    assert validate_request({**raw, "mode": "txt2img"}, limits).scheduler == "PNDM"
    with pytest.raises(RequestError, match="PNDM is not offered for this model in img2img: PNDM .PLMS. cannot start"):
        validate_request({**raw, "mode": "img2img"}, limits)
