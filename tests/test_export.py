"""Exports are watchable: animations scaled up as the page shows them, PNGs exact."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipelines.export import MIN_ANIMATION_SIDE, export


def frames(side=16, n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_small_frames_are_scaled_up_nearest(tmp_path, kind):
    small = frames(16)
    with Image.open(export(small, tmp_path / f"run.{kind}")) as animation:
        assert animation.size == (256, 256) and animation.n_frames == 3
        animation.seek(1)
        big = np.asarray(animation.convert("RGB"))
    # nearest neighbour: every 16x16 block is one source pixel (WebP is lossless, GIF palettes within a step)
    assert np.abs(big[::16, ::16].astype(int) - np.asarray(small[1]).astype(int)).max() <= (0 if kind == "webp" else 40)


def test_large_frames_and_the_png_zip_keep_their_pixels(tmp_path):
    with Image.open(export(frames(MIN_ANIMATION_SIDE + 8, 2), tmp_path / "run.gif")) as animation:
        assert animation.size == (MIN_ANIMATION_SIDE + 8,) * 2
    small = frames(16)
    with zipfile.ZipFile(export(small, tmp_path / "run.zip")) as archive:
        png = Image.open(io.BytesIO(archive.read("step_0002.png")))
        assert np.array_equal(np.asarray(png), np.asarray(small[1]))


def test_mp4_of_odd_sized_frames_has_even_sides(tmp_path):
    import av

    with av.open(str(export(frames(99, 2), tmp_path / "run.mp4"))) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (298, 298)  # 99 x 3 = 297, padded to even
