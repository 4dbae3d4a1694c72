"""Tiny random pipelines of every family: they load as diffusers folders, run txt2img and img2img, repeat."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    AutoPipelineForImage2Image,
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from pipelines import layout
from pipelines.tiny import main, save_tiny_family

CLASSES = {
    "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, 4),
    "sd3": (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, 16),
    "flux": (FluxPipeline, FluxImg2ImgPipeline, 16),
}


@pytest.fixture(scope="module", params=sorted(CLASSES))
def loaded(request, tiny_families):
    family = request.param
    pipe = DiffusionPipeline.from_pretrained(tiny_families(family))
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def txt2img(pipe, seed=7, **kw):
    out = pipe("a red square", num_inference_steps=2, width=64, height=64, output_type="np",
               generator=torch.Generator().manual_seed(seed), **kw)
    return out.images[0]


def test_folder_loads_as_its_family(loaded, tiny_families):
    family, pipe = loaded
    folder = tiny_families(family)
    assert type(pipe) is CLASSES[family][0]
    assert layout.is_untrained(folder)
    tiny_vae = AutoencoderTiny.from_pretrained(layout.tiny_vae_folder(folder))
    assert tiny_vae.config.latent_channels == pipe.vae.config.latent_channels == CLASSES[family][2]
    # the preview VAE decodes latents to the same size as the family's VAE
    latents = torch.zeros(1, CLASSES[family][2], 8, 8)
    with torch.no_grad():
        assert tiny_vae.decode(latents).sample.shape == pipe.vae.decode(latents).sample.shape == (1, 3, 16, 16)


def test_txt2img_is_repeatable_and_not_flat(loaded):
    family, pipe = loaded
    first, second = txt2img(pipe), txt2img(pipe)
    assert first.shape == (64, 64, 3)
    assert first.std() > 1e-3
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, txt2img(pipe, seed=8))


def test_img2img_from_pipe(loaded, scene):
    family, pipe = loaded
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    assert type(img2img) is CLASSES[family][1]
    out = img2img("a red square", image=scene, strength=0.5, num_inference_steps=2, width=64, height=64,
                  output_type="np", generator=torch.Generator().manual_seed(7)).images[0]
    assert out.shape == (64, 64, 3)
    assert out.std() > 1e-3


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_families):
    from safetensors.torch import load_file

    again = save_tiny_family(tmp_path / "again", "flux", seed=0)
    other = save_tiny_family(tmp_path / "other", "flux", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    base = load_file(tiny_families("flux") / name)
    assert all(torch.equal(base[k], v) for k, v in load_file(again / name).items())
    assert not all(torch.equal(base[k], v) for k, v in load_file(other / name).items())


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="family must be one of sd, sdxl, sd3, flux, flux-depth, not 'sd4'"):
        save_tiny_family("unused", "sd4")


def test_cli_writes_a_family(tmp_path):
    main(["sd3", str(tmp_path / "m")])  # what `python -m pipelines.tiny sd3 FOLDER` runs
    assert json.loads((tmp_path / "m" / layout.MODEL_INDEX).read_text())["_class_name"] == "StableDiffusion3Pipeline"


def test_t5_tokenizer_saves_loads_and_takes_any_prompt(tmp_path):
    from transformers import AutoTokenizer

    from pipelines.tiny import tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in ("a red square", "Ünïcode ★ 🎉", ""):
        ids = loaded(prompt).input_ids
        assert ids == tokenizer(prompt).input_ids
        assert ids[-1] == 1  # </s>, as T5 ends every sequence
    assert loaded.convert_ids_to_tokens(loaded("a ★").input_ids) == ["▁", "a", "▁", "<unk>", "</s>"]


@pytest.mark.parametrize("family, scheduler, vae", [
    ("sdxl", {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1},
     {"latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True}),
    ("sd3", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": False},
     {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False}),
    ("flux", {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
     {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
      "use_post_quant_conv": False}),
])
def test_configs_carry_the_shipped_constants(tiny_families, family, scheduler, vae):
    folder = tiny_families(family)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert {k: scheduler_config[k] for k in scheduler} == scheduler
    assert {k: vae_config[k] for k in vae} == vae
