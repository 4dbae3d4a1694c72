"""The training command end to end at toy sizes: every stage runs, the export loads with plain
from_pretrained, and a run resumed from a mid-stage checkpoint ends with the same weights."""
import shutil
import sys

import numpy as np
import pytest
import torch

from pipelines import layout
from training import scenes as S
from training import train

TOY = ["--threads", "2", "--vae-steps", "2", "--eval-every-vae", "2", "--n-latents", "64",
       "--unet-batch", "4", "--unet-steps", "4", "--eval-every-unet", "2", "--shape-steps", "2",
       "--eval-every-shape", "2", "--quick-n", "2", "--quick-n-shape", "2", "--steps", "2", "--guidance-grid", "2.0", "--guidance-n", "2",
       "--depth-steps", "2", "--eval-every-depth", "2", "--quick-n-depth", "2", "--dpt-steps", "2",
       "--dpt-batch", "2"]


def run_main(monkeypatch, runs, out, *extra):
    """`python -m training.train` at TOY sizes on both of CI's cores; the test process keeps its thread count."""
    monkeypatch.setattr(sys, "argv", ["train", "--runs", str(runs), "--out", str(out), *TOY, *extra])
    threads = torch.get_num_threads()
    try:
        train.main()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One full toy run; every checkpoint state it saves is kept (path name, step) -> state."""
    root = tmp_path_factory.mktemp("train")
    saved = {}
    real_save = train.save_ckpt

    def keep(path, **state):
        saved[(path.name, state.get("step"))] = {k: _clone(v) for k, v in state.items()}
        real_save(path, **state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_ckpt", keep)
        run_main(mp, root / "runs", root / "model")
    return root, saved


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v


def test_every_stage_checkpoints(toy_run):
    root, saved = toy_run
    run = root / "runs" / "seed0"
    for name in ("vae", "latents", "unet", "unet_shape", "depth_unet", "dpt"):
        assert (run / f"{name}.pt").exists(), name
    # the toy UNet misses the targets, so phase 2 ran to its cap from phase 1's EMA weights
    assert ("unet.pt", 4) in saved and ("unet_shape.pt", 2) in saved
    assert saved[("unet_shape.pt", 2)]["done"]


def test_export_loads_and_generates(toy_run):
    from diffusers import StableDiffusionPipeline
    root, _ = toy_run
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "model"))
    pipe.set_progress_bar_config(disable=True)
    im = pipe("a red circle on the left, blue background", num_inference_steps=2, height=64, width=64,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (64, 64)
    assert list(pipe.unet.config.block_out_channels) == [32, 64, 64]
    assert (root / "model" / layout.DEPTH_UNET / "config.json").exists()


def test_resume_mid_stage_gives_the_same_weights(toy_run, tmp_path, monkeypatch):
    root, saved = toy_run
    run = tmp_path / "runs" / "seed0"
    run.mkdir(parents=True)
    for name in ("vae.pt", "latents.pt"):
        shutil.copy(root / "runs" / "seed0" / name, run / name)
    mid = saved[("unet.pt", 2)]
    assert not mid["done"]
    torch.save(mid, run / "unet.pt")
    run_main(monkeypatch, tmp_path / "runs", tmp_path / "model", "--stages", "vae,latents,unet")
    assert "unet: resume at step 2" in (run / "train.log").read_text()
    for name in ("unet.pt", "unet_shape.pt"):
        want = saved[(name, 4 if name == "unet.pt" else 2)]["ema_unet"]
        got = torch.load(run / name)["ema_unet"]
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{name} {k}")


def test_same_seed_same_weights(toy_run, tmp_path, monkeypatch):
    """A second run from scratch rebuilds every stage bit for bit: no model init draws from an unseeded RNG."""
    root, saved = toy_run
    run_main(monkeypatch, tmp_path / "runs", tmp_path / "model")
    run = tmp_path / "runs" / "seed0"
    finals = {"vae.pt": ("model", 2), "unet.pt": ("ema_unet", 4), "unet_shape.pt": ("ema_unet", 2),
              "depth_unet.pt": ("ema_unet", 2), "dpt.pt": ("model", 2)}
    for name, (key, step) in finals.items():
        want, got = saved[(name, step)][key], torch.load(run / name)[key]
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{name} {k}")


def test_shape_disagreement_marks_corners_not_the_middle():
    r = S.SIZES["big"]
    obj = dict(shape="circle", cx=0.5, cy=0.5, r=r)
    m = train.shape_disagreement([dict(background="blue", objects=[obj])])[0, 0].numpy()
    c = train.LATENT // 2
    assert m[c, c] == 0 and m[0, 0] == 0  # inside every shape / outside every shape
    corner = c + int(0.9 * r * train.LATENT) - 1  # wholly inside the square's corner; the circle covers part of it
    assert m[corner, corner] == 1
    assert 0 < m.sum() < m.size / 2
    assert np.isin(m, [0, 1]).all()


def test_two_objects_mark_both():
    objs = [dict(shape="square", cx=0.25, cy=0.5, r=0.15), dict(shape="circle", cx=0.75, cy=0.5, r=0.15)]
    m = train.shape_disagreement([dict(background="blue", objects=objs)])[0, 0].numpy()
    half = train.LATENT // 2
    assert m[:, :half].sum() == m[:, half:].sum() > 0  # the same pixels around each centre


def test_named_objects_gives_each_word_its_object():
    from training.models import MAX_TOKENS
    from training.tokenizer import build_tokenizer

    tok = build_tokenizer(S.VOCAB_WORDS, MAX_TOKENS)
    two = dict(background="yellow", objects=[dict(shape="circle", colour="red", size="big"),
                                             dict(shape="circle", colour="blue", size="small")])
    one = dict(background="red", objects=[dict(shape="square", colour="blue", size="big")])
    captions = ["A BIG red circle on the left and a small blue circle on the right, yellow background",
                "red background, a blue shape", ""]
    ids = train.tokenize(tok, captions)
    got = train.named_objects(tok, ids, [two, one, one])
    words = [[t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(row)] for row in ids.tolist()]
    named = [{(w, i) for w, o in zip(ws, row.tolist()) for i in [o] if o >= 0} for ws, row in zip(words, got)]
    assert named[0] == {("big", 0), ("red", 0), ("circle", 0), ("small", 1), ("blue", 1), ("circle", 1)}
    assert named[1] == {("blue", 0), ("shape", 0)}  # "red" names the background here, not the object
    assert named[2] == set()


def test_grounding_loss_is_the_share_of_attention_outside_the_object():
    masks = torch.zeros(1, 2, train.LATENT, train.LATENT)
    masks[0, 0, :, :4] = 1  # object 0: the left quarter
    masks[0, 1, :, 8:] = 1  # object 1: the right half
    token_obj = torch.tensor([[-1, 0, 1]])
    hw = train.LATENT ** 2
    a = torch.zeros(1, hw, 3)
    a[0, :, 0] = 1.0  # an unnamed token: not counted
    a[0, :, 1] = masks[0, 0].flatten()  # all of it inside object 0
    a[0, :, 2] = 1.0  # spread evenly: half of it inside object 1
    assert float(train.grounding_loss([a], token_obj, masks)) == pytest.approx((0 + 0.5 ** 2) / 2)
    coarse = torch.nn.functional.avg_pool2d(a.transpose(1, 2).reshape(1, 3, 16, 16), 4).flatten(2).transpose(1, 2)
    assert float(train.grounding_loss([a, coarse], token_obj, masks)) == pytest.approx(0.125)  # pooled alike
    assert float(train.grounding_loss([a], torch.full((1, 3), -1), masks)) == 0


def test_cross_attention_maps_keep_the_gradient_and_leave_the_output_alone():
    from training.models import TEXT_DIM

    torch.manual_seed(0)
    unet = train.make_unet().eval()
    x, t, text = torch.randn(2, 4, train.LATENT, train.LATENT), torch.tensor([500, 900]), torch.randn(2, 5, TEXT_DIM)
    with torch.no_grad():
        plain = unet(x, t, text).sample
    attention = train.CrossAttentionMaps(unet)
    out = unet(x, t, text).sample
    torch.testing.assert_close(out, plain)
    sides = sorted(round(m.shape[1] ** 0.5) for m in attention.maps)
    assert sides == [4] * 4 + [8] * 3 + [16] * 3  # down 1 + mid 1 + up 2 at 4x4; down 1 + up 2 at 8 and 16
    for m in attention.maps:
        assert m.shape[0] == 2 and m.shape[2] == 5
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
    masks = torch.zeros(2, 2, train.LATENT, train.LATENT)
    masks[:, 0, 4:12, 4:12] = 1
    train.grounding_loss(attention.maps, torch.tensor([[-1, 0, 0, -1, -1]] * 2), masks).backward()
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight.grad.abs().sum() > 0
