import json
import threading

import pytest
import torch

from pipelines import ModelCache, ModelLoadError, layout
from pipelines.cache import param_bytes
from pipelines.tiny import save_tiny_checkpoint


def test_img2img_shares_the_txt2img_modules(cache, tiny_dir):
    txt = cache.pipeline("txt2img", str(tiny_dir))
    before = cache.total_bytes()
    img = cache.pipeline("img2img", str(tiny_dir))
    assert img is not txt
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(img, name) is getattr(txt, name)
    assert cache.total_bytes() == before  # no extra parameter bytes


def test_depth_family_shares_vae_text_encoder_and_tokenizer(tiny_dir):
    cache = ModelCache(device="cpu")  # its own: the session's may hold the depth pipeline already
    txt = cache.pipeline("txt2img", str(tiny_dir))
    before = cache.total_bytes()
    depth = cache.pipeline("depth2img", str(tiny_dir))
    for name in ("vae", "text_encoder", "tokenizer"):
        assert getattr(depth, name) is getattr(txt, name)
    assert depth.unet is not txt.unet and depth.unet.config.in_channels == 5
    added = cache.total_bytes() - before
    assert added == param_bytes(depth.unet, depth.depth_estimator)


def test_same_pipeline_is_handed_out_again(cache, tiny_dir):
    assert cache.pipeline("img2img", str(tiny_dir)) is cache.pipeline("img2img", str(tiny_dir))


def test_least_recently_used_checkpoint_is_evicted(tmp_path):
    a = save_tiny_checkpoint(tmp_path / "a", seed=1)
    b = save_tiny_checkpoint(tmp_path / "b", seed=2)
    probe = ModelCache(device="cpu")
    one = probe.checkpoint(str(a)).nbytes()
    cache = ModelCache(device="cpu", budget_bytes=int(one * 1.5))
    cache.checkpoint(str(a))
    cache.checkpoint(str(b))
    assert cache.loaded() == [str(b)]
    assert cache.total_bytes() <= int(one * 1.5)


def test_recently_used_entry_survives(tmp_path):
    paths = [save_tiny_checkpoint(tmp_path / n, seed=i) for i, n in enumerate("abc")]
    one = ModelCache(device="cpu").checkpoint(str(paths[0])).nbytes()
    cache = ModelCache(device="cpu", budget_bytes=int(one * 2.5))
    cache.checkpoint(str(paths[0]))
    cache.checkpoint(str(paths[1]))
    cache.checkpoint(str(paths[0]))  # touch a: b is now the least recent
    cache.checkpoint(str(paths[2]))
    assert cache.loaded() == [str(paths[0]), str(paths[2])]


def test_concurrent_cold_requests_load_once(tiny_dir):
    cache = ModelCache(device="cpu")
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.pipeline("txt2img", str(tiny_dir)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(p is got[0] for p in got)
    assert cache.loaded() == [str(tiny_dir)]


def test_fp32_on_cpu_and_device_is_cpu(cache, tiny_dir):
    pipe = cache.pipeline("txt2img", str(tiny_dir))
    assert cache.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert cache.checkpoint(str(tiny_dir)).attention == "sdpa"  # xformers is only tried on CUDA


def test_sdpa_processor_is_diffusers_maths_without_the_per_call_signature(cache, tiny_dir):
    import inspect

    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipelines.devices import SDPAProcessor
    unet = cache.pipeline("txt2img", str(tiny_dir)).unet
    assert {type(p) for p in unet.attn_processors.values()} == {SDPAProcessor}
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        ours = unet(x, t, text).sample
        unet.set_attn_processor(AttnProcessor2_0())
        try:
            theirs = unet(x, t, text).sample
        finally:
            unet.set_attn_processor(SDPAProcessor())
    assert torch.equal(ours, theirs)
    # what diffusers' Attention.forward reads on every call, now stored
    params = inspect.signature(SDPAProcessor().__call__).parameters
    assert {"attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb"} <= set(params)
    assert "__signature__" in vars(SDPAProcessor.__call__)


def test_missing_hub_model_offline_names_model_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        ModelCache(device="cpu").checkpoint("nobody/not-a-model")
    message = str(err.value)
    assert "nobody/not-a-model" in message and "HF_HUB_OFFLINE" in message and "--model PATH" in message


HUB_COMMIT = "0123abcd" * 5  # snapshots are named by 40-hex commit hashes (diffusers' AutoPipeline resolves refs/main)


def test_hub_id_loads_from_the_hf_cache_offline(monkeypatch, tmp_path):
    # the HF cache layout: models--org--name/snapshots/<rev>/..., refs/main -> rev
    repo = tmp_path / "hub" / "models--stepwise--tiny"
    save_tiny_checkpoint(repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    pipe = ModelCache(device="cpu").pipeline("txt2img", "stepwise/tiny")
    assert pipe.unet.config.in_channels == 4


def save_depth_class_checkpoint(folder):
    """A checkpoint saved as `StableDiffusionDepth2ImgPipeline`, as stabilityai/stable-diffusion-2-depth is."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    from pipelines.tiny import tiny_components

    parts = tiny_components(seed=3)
    StableDiffusionDepth2ImgPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["depth_unet"],
        scheduler=parts["scheduler"], depth_estimator=parts["depth_estimator"],
        feature_extractor=parts["feature_extractor"],
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An offline HF cache; `hub(save, "org/name")` puts a checkpoint in it under that repo id."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)

    def put(save, repo_id):
        # the HF cache layout: models--org--name/snapshots/<rev>/..., refs/main -> rev
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        save(repo / "snapshots" / HUB_COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(HUB_COMMIT)
        return repo_id

    return put


def classes_asked_in_order(source, modes):
    """For each mode in turn on one fresh cache: the pipeline class, or the error message."""
    cache, got = ModelCache(device="cpu"), []
    for mode in modes:
        try:
            got.append(type(cache.pipeline(mode, source)).__name__)
        except ModelLoadError as err:
            got.append(str(err))
    return got


NOT_A_DEPTH_MODEL = ("{!r} (SD 1.x/2.x) has no depth model; pass a depth ControlNet for SD 1.x/2.x with --controlnet, "
                     "e.g. lllyasviel/control_v11f1p_sd15_depth (SD 1.5), or an SD 2-depth checkpoint such as "
                     "stabilityai/stable-diffusion-2-depth with --depth-model")
ONLY_DEPTH = ("{!r} is a depth model (StableDiffusionDepth2ImgPipeline); it runs only depth2img: pass it with "
              "--depth-model, and a text-to-image checkpoint with --model")


@pytest.mark.parametrize("modes", [("depth2img", "txt2img", "img2img"), ("txt2img", "img2img", "depth2img")])
def test_the_checkpoint_not_the_first_request_decides_the_class(hub, tiny_dir, tmp_path, modes):
    sd = hub(save_tiny_checkpoint, "stepwise/sd")
    depth = hub(save_depth_class_checkpoint, "stepwise/sd-depth")
    local_depth = str(save_depth_class_checkpoint(tmp_path / "local-depth"))
    classes = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
               "depth2img": "StableDiffusionDepth2ImgPipeline"}
    # the bundled layout: a txt2img checkpoint with its depth UNet beside it runs every mode
    assert classes_asked_in_order(str(tiny_dir), modes) == [classes[m] for m in modes]
    assert classes_asked_in_order(sd, modes) == [NOT_A_DEPTH_MODEL.format(sd) if m == "depth2img" else classes[m]
                                                 for m in modes]
    for source in (depth, local_depth):
        assert classes_asked_in_order(source, modes) == [
            classes[m] if m == "depth2img" else ONLY_DEPTH.format(source) for m in modes]


def test_a_checkpoint_of_another_pipeline_class_is_refused_by_name(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "xl")
    index = json.loads((folder / layout.MODEL_INDEX).read_text())
    (folder / layout.MODEL_INDEX).write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelLoadError) as err:
        ModelCache(device="cpu").checkpoint(str(folder))
    assert str(err.value) == (f"{str(folder)!r} is a KandinskyV22Pipeline checkpoint; Stepwise runs "
                              "StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionDepth2ImgPipeline, "
                              "StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusion3Pipeline, "
                              "StableDiffusion3Img2ImgPipeline, FluxPipeline, FluxImg2ImgPipeline, "
                              "FluxControlPipeline, FluxControlImg2ImgPipeline checkpoints")


def test_tokenizer_loads_on_its_own_from_a_folder_or_the_hf_cache(hub, tiny_dir, cache):
    from pipelines.anatomy import load_tokenizers

    def load_tokenizer(source):
        [(attr, encoder, tokenizer, limit)] = load_tokenizers(source)  # SD: one CLIP
        assert (attr, encoder, limit) == ("tokenizer", "CLIP", 77)
        return tokenizer

    depth = hub(save_depth_class_checkpoint, "stepwise/sd-depth")
    prompt = "a red circle " * 10
    expected = cache.pipeline("txt2img", str(tiny_dir)).tokenizer(prompt).input_ids
    for source in (str(tiny_dir), depth):
        assert load_tokenizer(source)(prompt).input_ids == expected
    with pytest.raises(ModelLoadError, match="'stepwise/missing' is not in the local Hugging Face cache"):
        load_tokenizer("stepwise/missing")


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        ModelCache(device="cpu").checkpoint(str(tmp_path))


def test_failed_load_leaves_cache_usable(cache, tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError):
        cache.checkpoint(str(tmp_path / "missing" / "x"))
    assert cache.pipeline("txt2img", str(tiny_dir)) is not None


def test_txt2img_only_model_has_no_depth(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "c")
    import shutil

    shutil.rmtree(folder / layout.DEPTH_UNET)
    with pytest.raises(ModelLoadError, match="--depth-model"):
        ModelCache(device="cpu").pipeline("depth2img", str(folder))


def test_broken_tiny_vae_folder_names_the_load_failure(tmp_path, tiny_dir):
    broken = tmp_path / "taesd"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="could not load model .*taesd"):
        ModelCache(device="cpu", tiny_vae=str(broken)).checkpoint(str(tiny_dir))


def test_tiny_vae_preview_needs_a_tiny_vae(tmp_path):
    import shutil

    folder = save_tiny_checkpoint(tmp_path / "no-taesd")
    shutil.rmtree(folder / layout.TINY_VAE)
    checkpoint = ModelCache(device="cpu").checkpoint(str(folder))
    with pytest.raises(ValueError, match="preview 'tiny-vae' needs a tiny autoencoder"):
        checkpoint.decoder("tiny-vae")
    assert checkpoint.decoder("full-vae").vae is checkpoint.base.vae


def test_app_cpu_threads_leave_a_core_for_streaming(monkeypatch):
    from pipelines.devices import app_cpu_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [app_cpu_threads(c) for c in (1, 2, 8)] == [1, 1, 7]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert app_cpu_threads(8) == torch.get_num_threads()  # the user's choice stands


def test_offload_needs_a_gpu_and_names_its_kinds():
    with pytest.raises(ValueError, match=r"--offload model moves weights between CPU and a GPU; this run has no CUDA "
                                         r"device \(cpu\): leave --offload out"):
        ModelCache(device="cpu", offload="model")
    with pytest.raises(ValueError, match="offload 'disk': choose one of model, sequential"):
        ModelCache(device="cpu", offload="disk")


def test_an_unknown_device_is_a_clear_message():
    with pytest.raises(ValueError, match="device 'bogus' is not a device torch knows; use cuda, mps or cpu"):
        ModelCache(device="bogus")
