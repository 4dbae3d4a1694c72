"""The benchmark code runs (figures are printed by `python -m benchmarks.run`, not asserted here)."""

from benchmarks.gpu import gpu_section


def test_gpu_benchmark_runs_reduced_on_cpu():
    result = gpu_section(repeats=1)
    names = [row["variant"] for row in result["rows"]]
    assert result["size"] == 64 and "reduced size" in result["device"]
    for arch in ("SD 1.5", "SD 2-depth"):
        assert f"{arch}: bare diffusers (SDPA)" in names
        for preview in ("latent-rgb", "tiny-vae", "full-vae"):
            assert f"{arch}: app, {preview} every step" in names
    assert all(row["seconds"] > 0 for row in result["rows"])


def test_threads_benchmark_prints_bare_and_app_path(capsys):
    import re

    import torch

    from benchmarks.threads import main
    before = torch.get_num_threads()
    try:
        main(threads=1, repeats=1)
    finally:
        torch.set_num_threads(before)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"threads 1: bare \d+\.\d{3} s, app path \d+\.\d{3} s \(x\d+\.\d{2}\)", line), line
