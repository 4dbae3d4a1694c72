"""Single checkpoint files and models folders (pipelines/sources.py), on tiny models."""

import json

import numpy as np
import pytest
from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint
from safetensors.torch import save_file

import torch

from pipelines import ModelCache, ModelLoadError, generate, layout
from pipelines.generate import Final, Frame
from pipelines.sources import list_models, single_file_source, single_file_type
from pipelines.tiny import save_tiny_checkpoint
from tests.single_file import save_original_checkpoint


@pytest.fixture(scope="module")
def tiny_file(tiny_dir, tmp_path_factory):
    """The tiny SD checkpoint as one file in the original LDM layout."""
    return save_original_checkpoint(tiny_dir, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def final_image(cache, request, source):
    return next(item for item in generate(request, cache, source=source) if isinstance(item, Final)).image


def test_single_file_round_trip_gives_the_folders_image(tiny_dir, tiny_file, make_request):
    cache = ModelCache(device="cpu", single_file_config=str(tiny_dir))
    checkpoint = cache.checkpoint(str(tiny_file))
    assert checkpoint.family.name == "sd" and checkpoint.folder is None
    request = make_request(steps=4)
    from_file = np.asarray(final_image(cache, request, str(tiny_file)), dtype=int)
    from_folder = np.asarray(final_image(cache, request, str(tiny_dir)), dtype=int)
    assert from_file.shape == (64, 64, 3)
    assert np.abs(from_file - from_folder).max() == 0  # the same weights, converted there and back exactly


def test_tiny_file_is_v1_only_by_diffusers_last_resort(tiny_file):
    # SD 1.x's marker key (output_blocks.11) needs 4 blocks of 2 resnets; the tiny UNet has 2 of 1,
    # so diffusers answers "v1" because nothing else matched: the --config folder decides.
    state = load_single_file_checkpoint(str(tiny_file))
    assert infer_diffusers_model_type(state) == "v1"
    assert single_file_type(tiny_file) == ("v1", False)


def test_without_config_the_default_repo_is_named_with_the_download_command(tiny_file):
    with pytest.raises(ModelLoadError) as err:
        single_file_source(tiny_file)
    message = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert '`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "*.json" "*.txt" "*.model"`' in message
    assert "--config" in message


def test_a_file_whose_configs_are_missing_is_listed_as_broken_with_the_fix(tmp_path, tiny_file):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd15.safetensors").write_bytes(tiny_file.read_bytes())
    entries, broken = list_models(tmp_path / "models")  # offline, no --config: not offered, then refused
    assert entries == [] and list(broken) == ["sd15.safetensors"]
    assert '`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "*.json"' in broken["sd15.safetensors"]


@pytest.mark.parametrize("content, expected", [
    (b"", "is an empty file, not a checkpoint"),
    (bytes(range(256)) * 64, "is not a .safetensors checkpoint"),
    (b"a prompt list, renamed\n" * 10, "is not a .safetensors checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, tiny_dir, content, expected):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    cache = ModelCache(device="cpu", single_file_config=str(tiny_dir))
    with pytest.raises(ModelLoadError, match=expected) as err:
        cache.checkpoint(str(path))
    assert str(path) in str(err.value)


def test_a_ckpt_of_random_bytes_is_named(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ModelLoadError, match=r"model\.ckpt is not a \.ckpt checkpoint"):
        single_file_type(path)


def test_unknown_architecture_names_its_keys_and_the_families(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1), "lora_te_text.weight": torch.ones(2, 2)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        single_file_type(path)
    message = str(err.value)
    assert str(path) in message and "(2 tensors: lora_te_text.weight, lora_unet_down.alpha);" in message
    assert "SD 1.x/2.x (v1, v2); SDXL (xl_base); SD 3 (sd3, sd35_medium, sd35_large); Flux.1 (flux-dev, flux-schnell)" \
        in message


def test_an_architecture_no_family_owns_is_named(tmp_path, tiny_dir):
    path = tmp_path / "controlnet.safetensors"
    save_file({"control_model.time_embed.0.weight": torch.ones(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match=r"is a 'controlnet' checkpoint \(diffusers' name for it\); "
                                             r"Stepwise runs single files of SD 1.x/2.x \(v1, v2\)"):
        single_file_source(path, str(tiny_dir))


def test_other_files_are_not_taken_for_folders_or_hub_ids(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.safetensors or \.ckpt checkpoint; --model takes"):
        ModelCache(device="cpu").checkpoint(str(path))
    with pytest.raises(ModelLoadError, match="no such file"):
        ModelCache(device="cpu").checkpoint(str(tmp_path / "missing.safetensors"))


def test_models_dir_lists_folders_and_files_and_explains_broken_ones(tmp_path, tiny_dir, tiny_file):
    models = tmp_path / "models"
    models.mkdir()
    save_tiny_checkpoint(models / "b-folder", seed=1)
    (models / "a-file.safetensors").write_bytes(tiny_file.read_bytes())
    (models / "empty.ckpt").write_bytes(b"")
    (models / "bad-index").mkdir()
    (models / "bad-index" / layout.MODEL_INDEX).write_text("{not json")
    (models / "video").mkdir()
    (models / "video" / layout.MODEL_INDEX).write_text(json.dumps({"_class_name": "WanPipeline"}))
    (models / "notes.txt").write_text("not a model")
    (models / "loras").mkdir()

    entries, broken = list_models(models, config=str(tiny_dir))
    assert [(e.name, e.family.name) for e in entries] == [("a-file.safetensors", "sd"), ("b-folder", "sd")]
    assert entries[0].label == "a-file.safetensors (SD 1.x/2.x)"
    assert sorted(broken) == ["bad-index", "empty.ckpt", "video"]
    assert "model_index.json is not a readable JSON object" in broken["bad-index"]
    assert "is an empty file, not a checkpoint" in broken["empty.ckpt"]
    assert "a WanPipeline checkpoint; Stepwise runs" in broken["video"]
    cache = ModelCache(device="cpu", single_file_config=str(tiny_dir))
    assert [cache.checkpoint(e.source).family.name for e in entries] == ["sd", "sd"]


def test_models_dir_must_be_a_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="--models-dir .* is not a folder"):
        list_models(tmp_path / "nowhere")


def test_a_running_checkpoint_is_not_evicted_until_its_run_ends(tmp_path, make_request):
    a, b, c = (str(save_tiny_checkpoint(tmp_path / n, seed=i)) for i, n in enumerate("abc"))
    one = ModelCache(device="cpu").checkpoint(a).nbytes()
    cache = ModelCache(device="cpu", budget_bytes=int(one * 1.5))  # fits one
    run = generate(make_request(steps=3), cache, source=a)
    assert isinstance(next(run), Frame)  # a's run is in progress
    cache.checkpoint(b)
    assert cache.loaded() == [a, b]  # over budget: a is running and b was just asked for
    cache.checkpoint(c)
    assert cache.loaded() == [a, c]  # b was the one that could go
    items = list(run)
    assert isinstance(items[-1], Final)
    assert cache.loaded() == [c]  # a's run ended: back under budget


def test_a_closed_run_releases_its_checkpoint(tmp_path, tiny_dir, make_request):
    cache = ModelCache(device="cpu")
    run = generate(make_request(steps=3), cache, source=str(tiny_dir))
    next(run)
    assert cache.checkpoint(str(tiny_dir)).runs == 1
    run.close()
    assert cache.checkpoint(str(tiny_dir)).runs == 0


def test_models_dir_start_model_is_the_first_listed_and_a_switch_loads_through_the_cache(tmp_path, tiny_dir, tiny_file):
    import app as app_module

    models = tmp_path / "models"
    models.mkdir()
    (models / "a-file.safetensors").write_bytes(tiny_file.read_bytes())
    save_tiny_checkpoint(models / "b-folder", seed=1)
    (models / "broken.safetensors").write_text("not weights")
    args = app_module.parse_args(["--models-dir", str(models), "--config", str(tiny_dir)])
    choices, broken = app_module.model_menu(args)
    assert choices == [("a-file.safetensors (SD 1.x/2.x)", str(models / "a-file.safetensors")),
                       ("b-folder (SD 1.x/2.x)", str(models / "b-folder"))]
    assert list(broken) == ["broken.safetensors"]
    cache = ModelCache(device="cpu", single_file_config=str(tiny_dir))
    view = app_module.model_view(cache, choices[1][1], choices[1][0])
    assert view.untrained and view.limits.family == "SD 1.x/2.x" and view.defaults["width"] == 32
    assert cache.loaded() == [str(models / "b-folder")]


def test_models_dir_without_a_model_that_loads_exits_with_the_reasons(tmp_path):
    import app as app_module

    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no model that loads\n  empty.ckpt: .* is an empty file"):
        app_module.model_menu(app_module.parse_args(["--models-dir", str(tmp_path)]))
