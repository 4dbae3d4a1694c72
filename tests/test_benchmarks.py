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


def test_families_benchmark_prints_one_row_per_family_and_preview(tmp_path, capsys):
    import json
    import re

    import torch

    from benchmarks.families import main
    before = torch.get_num_threads()
    try:
        main(["--side", "32", "--steps", "1", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(before)
    rows = [re.fullmatch(r"  (SD 1\.x/2\.x|SDXL|SD 3|Flux\.1) +(latent-rgb|tiny-vae|full-vae) +(Euler a?) +"
                         r"(\d+\.\d\d) +(\d+\.\d\d) +(\d+\.\d{3})", line)
            for line in capsys.readouterr().out.splitlines()]
    printed = [(m[1], m[2]) for m in rows if m]
    assert printed == [(label, preview) for label in ("SD 1.x/2.x", "SDXL", "SD 3", "Flux.1")
                       for preview in ("latent-rgb", "tiny-vae", "full-vae")]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(r["family"], r["preview"]) for r in saved["rows"]] == [
        (family, preview) for family in ("sd", "sdxl", "sd3", "flux") for preview in ("latent-rgb", "tiny-vae", "full-vae")]
    assert all(r["bare_ms_per_step"] > 0 and r["app_ms_per_step"] > 0 for r in saved["rows"])
    assert saved["machine"]["threads"] == 1


def test_gpu_families_benchmark_runs_tiny_on_cpu():
    import pytest
    import torch

    from benchmarks.gpu_families import gpu_families_section
    result = gpu_families_section(full=False, repeats=1)
    assert [(r["variant"], r["side"], r["steps"]) for r in result["rows"]] == [
        (f"{label}: {variant}", 64, 2) for label in ("SDXL", "FLUX.1 schnell")
        for variant in ("bare diffusers (SDPA)", "app, latent-rgb every step", "app, tiny-vae every step")]
    assert all(r["seconds"] > 0 for r in result["rows"]) and "tiny configs" in result["note"]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="full-size SDXL and Flux need a CUDA GPU; pass --tiny"):
            gpu_families_section(full=True)


def test_gpu_families_full_configs_have_the_published_parameter_counts():
    """Built on the meta device (no memory): millions of parameters as the real checkpoints' safetensors hold."""
    import torch

    from benchmarks.gpu_families import _made_on, full_flux_schnell, full_sdxl, schnell_scheduler, sdxl_scheduler
    counts = {}
    for build, scheduler in ((full_sdxl, sdxl_scheduler), (full_flux_schnell, schnell_scheduler)):
        with _made_on("meta", torch.bfloat16):
            pipe, _ = build(scheduler())
        counts[build.__name__] = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                                  for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert counts == {
        "full_sdxl": {"vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7, "unet": 2567.5},
        "full_flux_schnell": {"vae": 83.8, "text_encoder": 123.1, "text_encoder_2": 4762.3, "transformer": 11891.2},
    }


def test_attention_benchmark_prints_the_shares_of_each_word(tmp_path, capsys):
    import json
    import re

    import torch

    from benchmarks.attention import main
    before = torch.get_num_threads()
    try:
        main(["--captions", "1", "--json", str(tmp_path / "a.json")])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert re.search(r"\n  step 10 of 20 \(headline\) +[01]\.00 +[01]\.00 +[01]\.00\n", out), out
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["mid_step"] == 10 and saved["caption_stream"] == [18, 1800]
    assert set(saved["headline"]) == {"shape", "colour", "background"} and len(saved["per_step_shape"]) == 20
    assert [row["prompt"] for row in saved["captions_rows"]] == ["an orange triangle at the bottom, green background"]


def test_attention_cost_benchmark_times_off_and_on_in_a_child_process():
    from benchmarks.attention import cost
    result = cost(rounds=1, repeats=1, against=None)
    assert set(result["seconds_median"]) == {"now bare", "now off", "now on"}
    assert all(t > 0 for t in result["cpu_seconds_median"].values())
    kept = result["bytes_per_step"]
    # 20 frames; recording adds the (T, 16, 16) float16 maps of the prompt's 9 tokens to each
    assert kept["now on"] - kept["now off"] == 9 * 16 * 16 * 2
    # the run's file: latents [21, 4, 16, 16], x0, noise_pred and the guidance pair [20, 4, 16, 16] float32, the header
    saved = result["file_bytes_per_step"]
    assert 0 < saved["now off"] * 20 - (21 + 4 * 20) * 4 * 16 * 16 * 4 < 4096
    assert 0 <= (saved["now on"] - saved["now off"]) * 20 - 20 * 9 * 16 * 16 * 2 < 1024
    assert result["on_over_off"]["median"] > 0 and len(result["on_over_off"]["rounds"]) == 1


def test_callback_section_times_the_step_callback_of_every_step():
    import torch

    from benchmarks.run import callback_section, card_settings
    from pipelines.cache import bundled_folder
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        source = str(bundled_folder())
        rows = callback_section(source, card_settings(source, 3), repeats=2, previews=["latent-rgb", "full-vae"])
    finally:
        torch.set_num_threads(before)
    assert [(r["preview"], r["calls"]) for r in rows] == [("latent-rgb", 6), ("full-vae", 6)]  # warm-up not counted
    assert all(0 < r["callback_us_median"] <= r["callback_us_p90"] for r in rows)


def test_streaming_section_times_the_final_image_and_every_picture_made():
    """On a CPU the view not streamed is made after the final image: the section times both, and each
    app run returns with every picture made, so none of its work lands in the next variant's time."""
    import torch

    from benchmarks.run import card_settings, streaming_section
    from pipelines.cache import bundled_folder
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        source = str(bundled_folder())
        rows = streaming_section(source, card_settings(source, 3), repeats=1, previews=["full-vae"])
    finally:
        torch.set_num_threads(before)
    assert [r["variant"] for r in rows] == ["bare diffusers (no callback)"] + [
        f"app: full-vae, {view}, decode {how}" for view in ("x_t", "x0") for how in ("inline", "thread")]
    assert rows[0]["seconds"] > 0 and all(0 < r["seconds"] < r["every_picture_seconds"] for r in rows[1:])
    assert all(r["every_picture_ratio"] == r["every_picture_seconds"] / rows[0]["seconds"] for r in rows[1:])


def test_server_section_postprocesses_an_update_a_step():
    """The replayed frames come faster than the page's update interval; the section times every step's update
    all the same (its figures are per yield), and leaves the interval as it found it."""
    from benchmarks.run import card_settings, server_section
    from pipelines import ModelCache
    from pipelines.cache import bundled_folder
    from ui import events

    source = str(bundled_folder())
    [row] = server_section(ModelCache(device="cpu"), source, card_settings(source, 3), step_counts=(3,))
    assert row["steps"] == 3 and row["yields"] == 3 + 1  # each step, then the final image
    assert 0 < row["server_ms_per_yield_median"] and events.UPDATE_INTERVAL == 0.1


def test_e2e_benchmark_breaks_submit_to_final_image_down(tmp_path, capsys):
    import json
    import re

    from benchmarks.e2e import PARTS, main
    result = main(["--steps", "2", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "e.json")])
    [row] = result["app"]
    assert row["steps"] == 2 and row["bare_threads"] == 1 and row["bare_seconds"] > 0
    assert all(row[part] > 0 for part in PARTS) and row["final_to_done"] > 0
    assert abs(sum(row[part] for part in PARTS) - row["submit_to_final"]) < 1e-9  # one run: the parts add up
    assert row["ratio"] == row["submit_to_final"] / row["bare_seconds"]
    assert row["runs"][0]["bare_seconds"] == row["bare_seconds"]  # a bare call before each app run
    # the page's start values, seed and steps set by the benchmark
    assert result["settings"]["seed"] == 7 and {"width", "height", "scheduler", "preview"} <= set(result["settings"])
    assert json.loads((tmp_path / "e.json").read_text())["app"][0]["steps"] == 2
    out = capsys.readouterr().out
    assert re.search(r"\n +2 +\d+\.\d{3} +\d+\.\d{3} +\d+\.\d\d" + r" +\d+\.\d{3}" * 5 + "\n", out), out
