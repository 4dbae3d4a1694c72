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
