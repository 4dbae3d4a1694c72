"""The micro model's scenes, captions and scorer (training/scenes.py, training/scorer.py): what the
training sees and what the evaluation trusts."""
import numpy as np
import pytest
from PIL import Image

from training import scenes as S
from training.models import MAX_TOKENS
from training.scorer import analyse, score
from training.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(S.VOCAB_WORDS, MAX_TOKENS)


@pytest.mark.parametrize("n_objects", [1, 2])
def test_scorer_reads_rendered_truth(n_objects):
    """On renders (no model involved) the scorer reads back what the scene holds: its own error rate
    sits under the model's targets, so a miss in the evaluation is the model's."""
    rng = np.random.default_rng([19, n_objects])
    rows = [score(Image.fromarray(S.render(s)[0]), S.named(s)) for s in (S.sample_scene(rng, n_objects) for _ in range(60))]
    for key in rows[0]:
        share = np.mean([r[key] for r in rows])
        assert share >= 0.97, (key, share)


def test_each_shape_reads_as_itself_at_both_sizes():
    for shape in S.SHAPES:
        for size, r in S.SIZES.items():
            s = dict(background="blue", objects=[dict(shape=shape, colour="red", position="center", size=size,
                                                      cx=0.5, cy=0.5, r=r)])
            got = analyse(S.render(s)[0])
            assert (got["shape"], got["colour"], got["position"], got["background"]) == (shape, "red", "center", "blue")


def test_two_objects_sit_in_their_own_halves_with_their_own_colours():
    rng = np.random.default_rng([19, 3])
    for _ in range(200):
        s = S.sample_scene(rng, 2)
        a, b = s["objects"]
        assert {a["position"], b["position"]} in ({"left", "right"}, {"top", "bottom"})
        assert len({a["colour"], b["colour"], s["background"]}) == 3
        _, depth = S.render(s, 64)
        for o in s["objects"]:
            alone = S.render(dict(s, objects=[o]), 64)[1]
            x0, y0, x1, y1 = (int(v * 64) for v in {"left": (0, 0, .5, 1), "right": (.5, 0, 1, 1),
                                                   "top": (0, 0, 1, .5), "bottom": (0, .5, 1, 1)}[o["position"]])
            assert alone[y0:y1, x0:x1].sum() >= 0.97 * alone.sum()  # (almost) all of it in its half
        assert depth.max() == pytest.approx(1.0, abs=0.01)


def test_captions_are_whole_word_tokens_that_fit(tok):
    rng = np.random.default_rng([19, 4])
    longest = 0
    for _ in range(300):
        s = S.sample_scene(rng)
        for cap in (S.canonical_caption(s), S.random_caption(s, rng)):
            ids = tok(cap).input_ids
            assert len(ids) - 2 == len(cap.replace(",", " ,").split()), cap  # one token per word and comma
            longest = max(longest, len(ids))
    assert longest <= MAX_TOKENS
    assert S.canonical_caption(dict(background="yellow", objects=[
        dict(shape="circle", colour="red", position="left"), dict(shape="square", colour="orange", position="right")])) \
        == "a red circle on the left and an orange square on the right, yellow background"


def test_a_caption_leaves_positions_out_only_where_they_are_the_default():
    """An unnamed position means the centre (two objects: the first named on the left), except where a
    depth map places the objects (`any_layout`)."""
    rng = np.random.default_rng([19, 5])
    words = {"left", "right", "top", "bottom", "center", "centre", "middle"}
    left_open = {False: set(), True: set()}
    for _ in range(2000):
        s = S.sample_scene(rng)
        for any_layout in (False, True):
            cap = S.random_caption(s, rng, p_drop=0.0, any_layout=any_layout).lower()
            if "circle" in cap or "square" in cap or "triangle" in cap or "cross" in cap or "shape" in cap:
                if not words & set(cap.replace(",", " ").split()):
                    left_open[any_layout].add(tuple(o["position"] for o in s["objects"]))
    assert left_open[False] == {("center",), ("left", "right")}
    assert left_open[True] == {(p,) for p in S.POSITIONS} | {("left", "right"), ("right", "left"),
                                                             ("top", "bottom"), ("bottom", "top")}
