"""Cross-attention maps on the bundled micro model are well-formed and say where the words look (issue 18).

The captions are the first 8 of the 100 that `python -m benchmarks.attention --captions 100 --seed 18`
measures (BENCHMARKS.md: at step 10 of 20 the shape word peaked inside the object's box in 92 of 100,
the colour word in 100, "background" in 7). Seeds are fixed, so each run is the same every time; the
bars leave one caption of slack for a CPU whose float rounding moves a near-tied peak.
"""

import numpy as np
import pytest

from benchmarks.attention import (WORDS, CaptionRun, binding, fresh_scenes, mid_step, object_box, peaks_inside,
                                  run_caption, shares)
from pipelines import ModelCache, layout
from pipelines.cache import bundled_folder
from training import scenes as S

SEED, CAPTIONS = 18, 8


@pytest.fixture(scope="module")
def runs():
    source = str(bundled_folder())
    card = layout.read_card(bundled_folder())
    settings = dict(steps=card["steps"], guidance_scale=card["guidance_scale"], scheduler=card["scheduler"],
                    width=card["width"], height=card["height"])
    cache = ModelCache(device="cpu")
    return [run_caption(cache, source, settings, scene, SEED * 1000 + i, layers=i == 0)
            for i, scene in enumerate(fresh_scenes(CAPTIONS, SEED))]


def test_maps_are_per_token_probabilities_on_the_latent_grid(runs):
    for run in runs:
        assert run.maps.shape == (20, len(run.tokens), 16, 16)
        o = run.scene["objects"][0]
        assert run.tokens[1:3] == (o["colour"], o["shape"]) and run.tokens[0] in ("a", "an")
        assert run.maps.min() >= 0
        # the prompt's tokens leave out the start, end and padding positions: their share is what is left of 1
        assert run.maps.sum(axis=1).max() <= 1 + 1e-3
        assert run.maps.sum(axis=1).min() > 0.05


def test_each_layer_distributes_every_pixel_over_all_text_positions(runs):
    """Before any selection, each layer's probabilities over the 16 text positions sum to 1 at every
    latent pixel (bilinear upsampling keeps the sum), and the run's map is their mean at the prompt's tokens."""
    layers = runs[0].layers
    assert len(layers) == 10  # the micro UNet's cross-attention layers: 3 down, 1 mid, 6 up
    for maps in layers.values():
        assert maps.shape == runs[0].maps.shape
    # the run keeps float16 maps; the layers here are float32
    np.testing.assert_allclose(np.mean(list(layers.values()), axis=0), runs[0].maps, atol=1e-3)


def test_shape_and_colour_words_peak_inside_the_object_and_background_does_not(runs):
    mid = mid_step(20)
    assert mid == 10
    got = shares(runs, lambda r: r.maps[mid - 1])
    assert set(got) == set(WORDS)
    assert got["shape"] >= 7 / 8
    assert got["colour"] >= 7 / 8
    assert got["background"] <= 1 / 8


def test_object_box_holds_the_rendered_shape_in_latent_pixels():
    rng = np.random.default_rng([18, 99])
    for _ in range(60):
        for obj in S.sample_scene(rng)["objects"]:
            x0, y0, x1, y1 = object_box(obj, 16)
            mask = S.shape_mask(obj["shape"], obj["cx"] * 16, obj["cy"] * 16, obj["r"] * 16, 16, 16, ss=16)
            rows, cols = np.nonzero(mask > 0)
            # every covered latent pixel touches the box, and the box reaches no further than the coverage
            # (give or take the mask's sampling step, 1/16 of a pixel)
            assert x0 >= cols.min() - 1 / 16 and x1 <= cols.max() + 1 + 1 / 16
            assert y0 >= rows.min() - 1 / 16 and y1 <= rows.max() + 1 + 1 / 16
            assert x0 < cols.min() + 1 and x1 > cols.max() and y0 < rows.min() + 1 and y1 > rows.max()


def test_a_peak_counts_inside_when_its_pixel_centre_is_in_the_box():
    m = np.zeros((16, 16), np.float32)
    m[4, 7] = 1  # pixel centre (7.5, 4.5)
    assert peaks_inside(m, (7.5, 4.5, 9.0, 6.0))
    assert not peaks_inside(m, (7.6, 4.0, 9.0, 6.0))
    assert not peaks_inside(m, (6.0, 2.0, 9.0, 4.4))


def test_binding_counts_each_colour_word_on_its_own_object():
    objects = [dict(shape="circle", colour="red", position="left", size="small", cx=0.25, cy=0.5, r=0.15),
               dict(shape="square", colour="blue", position="right", size="small", cx=0.75, cy=0.5, r=0.15)]
    scene = dict(background="yellow", objects=objects)
    tokens = tuple(S.canonical_caption(scene).replace(",", " ,").split())
    maps = np.zeros((20, len(tokens), 16, 16), np.float32)
    maps[9, tokens.index("red"), 8, 4] = 1  # step 10: on the red circle
    maps[9, tokens.index("blue"), 8, 3] = 1  # on the red circle too: bound to the wrong object
    maps[0, tokens.index("blue"), 8, 12] = 1  # another step's peak does not count
    assert binding([CaptionRun(scene, "", tokens, maps, None)]) == {"mid_step": 10, "inside": 0.5, "nearer": 0.5}
