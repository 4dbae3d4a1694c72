import threading

import pytest
import torch

from pipelines import ModelCache, ModelLoadError
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


def test_depth_family_shares_vae_text_encoder_and_tokenizer(cache, tiny_dir):
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


def test_hub_id_loads_from_the_hf_cache_offline(monkeypatch, tmp_path):
    # the HF cache layout: models--org--name/snapshots/<rev>/..., refs/main -> rev
    repo = tmp_path / "hub" / "models--stepwise--tiny"
    save_tiny_checkpoint(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    pipe = ModelCache(device="cpu").pipeline("txt2img", "stepwise/tiny")
    assert pipe.unet.config.in_channels == 4


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

    shutil.rmtree(folder / "depth_unet")
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
    shutil.rmtree(folder / "tiny_vae")
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
