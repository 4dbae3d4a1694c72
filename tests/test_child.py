"""Generation in a child process (`pipelines.child`): the same frames and pixels as in one process, Stop,
a consumer that leaves, errors, and a child that dies."""

import os
import signal

import numpy as np
import pytest
import torch

from pipelines import CancelToken, Final, Frame, GenerationError, ModelLoadError, generate
from pipelines.child import GenerationProcess

from .conftest import pixels

PICTURES = ("xt_pixels", "x0_pixels", "start_pixels")


@pytest.fixture(scope="module")
def child(tiny_dir, cache):
    # the child decodes at this process's thread count, as the in-process run it is compared with
    process = GenerationProcess({"device": "cpu"}, torch.get_num_threads(),
                                lambda source, preview: cache.checkpoint(source).decoder(preview), str(tiny_dir))
    yield process
    process.shutdown()


def run(child, request, source, cancel=None):
    items = list(child.generate(request, cancel or CancelToken(), source))
    return [i for i in items if isinstance(i, Frame)], [i for i in items if isinstance(i, Final)]


@pytest.mark.parametrize("mode", ["txt2img", "depth2img"])
@pytest.mark.parametrize("preview", ["full-vae", "latent-rgb"])
def test_a_run_in_the_child_is_the_one_process_run(child, cache, tiny_dir, make_request, preview, mode):
    """Every step, every picture (made here from their latents: the child makes none; a depth2img run's depth
    map, at the latents' size, is no picture's size), every tensor and the final image are the one-process
    run's."""
    request = make_request(mode, steps=5, preview=preview, view="x0", record_attention=True)
    alone = list(generate(request, cache, source=str(tiny_dir)))
    frames, [final] = run(child, request, str(tiny_dir))
    assert [f.step for f in frames] == [f.step for f in alone[:-1]] == list(range(1, len(frames) + 1))
    # the child made no picture: this process makes each, from its latents, when read
    assert not any(f.x0_pixels.made or f.xt_pixels.made or (f.start_pixels and f.start_pixels.made) for f in frames)
    assert np.array_equal(pixels(final.image), pixels(alone[-1].image)) and final.notes == alone[-1].notes
    for mine, theirs in zip(frames, alone[:-1], strict=True):
        for name in (*PICTURES, "depth_pixels", "latents", "x0", "noise_pred", "attention"):
            a, b = getattr(mine, name), getattr(theirs, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a.tensor(), b.tensor())), name


def test_stop_and_a_consumer_that_leaves_end_the_childs_run_and_the_next_runs_whole(child, tiny_dir, make_request):
    cancel = CancelToken()
    stream = child.generate(make_request(steps=150), cancel, str(tiny_dir))
    first = next(stream)
    cancel.cancel()  # Stop
    rest = list(stream)
    assert first.step == 1 and len(rest) < 149 and not any(isinstance(i, Final) for i in rest)
    stream = child.generate(make_request(steps=150), CancelToken(), str(tiny_dir))
    next(stream)
    stream.close()  # the client went away
    frames, finals = run(child, make_request(steps=4, seed=9), str(tiny_dir))
    assert [f.step for f in frames] == [1, 2, 3, 4] and len(finals) == 1


def test_an_error_in_the_child_is_raised_here_with_its_message_and_a_child_that_dies_costs_one_run(
        cache, tiny_dir, make_request):
    decoder = cache.checkpoint(str(tiny_dir)).decoder  # this process has the model; the child is asked for another
    child = GenerationProcess({"device": "cpu"}, 1, lambda source, preview: decoder(preview))
    try:
        with pytest.raises(ModelLoadError, match="no-such-model"):
            run(child, make_request(), str(tiny_dir / "no-such-model"))
        stream = child.generate(make_request(steps=150), CancelToken(), str(tiny_dir))
        shown = [next(stream)]
        os.kill(child._process.pid, signal.SIGKILL)
        with pytest.raises(GenerationError, match=r"the generation process stopped at step \d+ .*Generate again"):
            shown.extend(stream)
        assert shown[0].step == 1
        frames, finals = run(child, make_request(steps=3), str(tiny_dir))  # a new child
        assert len(frames) == 3 and len(finals) == 1
    finally:
        child.shutdown()


def test_a_child_that_cannot_load_its_model_says_why_at_each_run(tmp_path, make_request):
    child = GenerationProcess({"device": "cpu"}, 1, lambda source, preview: None, str(tmp_path / "no-such-model"))
    try:
        for _ in range(2):  # the second run starts a new child, which says the same
            first = child._process
            with pytest.raises(ModelLoadError, match="no-such-model"):
                run(child, make_request(), str(tmp_path / "no-such-model"))
            assert first.wait(10) == 0
        assert child._process is not first
    finally:
        child.shutdown()


def test_stop_before_the_child_has_loaded_ends_the_run_and_a_shut_down_child_takes_no_run(cache, tiny_dir,
                                                                                         make_request):
    child = GenerationProcess({"device": "cpu"}, 1, lambda source, preview: None, str(tiny_dir))
    cancel = CancelToken()
    cancel.cancel()  # Stop while the child still imports torch: the run ends with nothing, at once
    assert list(child.generate(make_request(), cancel, str(tiny_dir))) == []
    child.shutdown()
    assert child._process.poll() is not None
    with pytest.raises(GenerationError, match="shutting down"):
        run(child, make_request(), str(tiny_dir))
    child.shutdown()  # again: a no-op
