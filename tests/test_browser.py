"""The app in a real browser: Debian's Chromium driven by Playwright.

CI installs chromium (.ci/run) and sets STEPWISE_REQUIRE_BROWSER=1, so a missing
browser fails there instead of skipping. Failed tests leave a screenshot in
artifacts/screenshots/.
"""

import io
import os
import shutil
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import app as app_module
from pipelines import ModelCache, layout

from .conftest import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"

if not os.path.exists(CHROMIUM):
    if os.environ.get("STEPWISE_REQUIRE_BROWSER"):
        raise RuntimeError(f"browser tests need Chromium at {CHROMIUM}")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

playwright = pytest.importorskip("playwright.sync_api")
# Chromium as root, offline: no sandbox, and none of its background calls home
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, url, request):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#generate-txt2img")
    yield page
    report = getattr(request.node, "rep_call", None)  # set by conftest's makereport hook
    if report is None or report.failed:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SHOTS / f"{request.node.name}.png", full_page=True)
    page.close()


@pytest.fixture
def scene(tmp_path):
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (30, 40, 200)
    pixels[16:48, 16:48] = (220, 30, 30)
    path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def gallery_count(page) -> int:
    return page.locator("#steps-gallery img").count()


def test_sliders_generate_live_preview_and_full_gallery(page):
    # idle: Stop is a small button, not a full-width red bar, and the status says what to do
    assert page.locator("#stop").bounding_box()["width"] < 150
    assert page.inner_text("#status") == "Ready: press Generate to watch every step."
    set_number(page, "seed", 5)
    set_number(page, "steps", 12)
    set_number(page, "guidance", 3)
    assert page.locator("#steps input[type=range]").input_value() == "12"
    # every picture the live preview shows, recorded in the page as it changes (polling from here missed
    # them once the run got faster than a round trip)
    page.evaluate("""() => { const root = document.querySelector('#live-preview'); window.previewSeen = new Set();
        const note = () => root.querySelectorAll('img').forEach(img => img.src && window.previewSeen.add(img.src));
        new MutationObserver(note).observe(root, {subtree: true, childList: true, attributes: true,
                                                  attributeFilter: ['src']}); }""")
    page.click("#generate-txt2img")
    page.wait_for_selector("#final-image img", timeout=60_000)
    assert page.evaluate("window.previewSeen.size") >= 2  # the preview changed while the run streamed
    page.wait_for_function("document.querySelectorAll('#steps-gallery img').length >= 12")
    page.wait_for_function("document.querySelector('#status').innerText.includes('step 12/12')")
    assert gallery_count(page) == 12
    assert "seed 5 ·" in page.inner_text("body")
    # each step's caption is one line at the foot of its thumbnail, shown whole (not over half of it, cut off)
    captions = page.evaluate("""[...document.querySelectorAll('#steps-gallery .caption-label')].map(c => {
        const thumb = c.closest('.thumbnail-item').getBoundingClientRect(), box = c.getBoundingClientRect();
        return {text: c.innerText, height: box.height / thumb.height, cut: c.scrollWidth > c.clientWidth,
                foot: (thumb.bottom - box.bottom) / thumb.height}; })""")
    assert [c["text"].split(" · ")[0] for c in captions] == [f"step {i}/12" for i in range(1, 13)]
    assert all(c["height"] < 0.2 and not c["cut"] and c["foot"] < 0.1 for c in captions), captions


def test_stop_mid_run_keeps_the_steps_so_far(page):
    set_number(page, "steps", 150)
    page.click("#generate-txt2img")
    page.wait_for_function("document.querySelector('#status').innerText.match(/step [1-9]\\d*\\/150/)")
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').innerText.includes('stopped')")
    stopped_at = gallery_count(page)
    assert 0 < stopped_at < 150
    assert "Stopped at step" in page.inner_text("body")
    assert page.locator("#final-image img").count() == 0


def test_send_to_img2img_then_generate(page):
    set_number(page, "steps", 6)
    page.click("#generate-txt2img")
    page.wait_for_selector("#final-image img")
    page.click("#send-img2img")
    page.wait_for_selector("#img2img-input img")
    page.click("#generate-img2img")
    page.wait_for_function("document.body.innerText.includes('img2img · seed')")
    page.wait_for_selector("#final-image img")


def test_depth_tab_with_an_uploaded_image(page, scene):
    page.get_by_role("tab", name="depth").click()
    set_number(page, "steps", 6)
    page.locator("#depth-input input[type=file]").set_input_files(scene)
    page.wait_for_selector("#depth-input img")
    page.click("#generate-depth2img")
    page.wait_for_selector("#depth-used img")
    page.wait_for_function("document.body.innerText.includes('depth2img · seed')")
    page.wait_for_selector("#final-image img")


def scrub_and_export(page, steps: int, one: int, other: int) -> Image.Image:
    """On the run the timeline shows (`steps` steps): step `one`, step 0 (the start), step `other`,
    whose x0 must differ from step `one`'s; then the GIF download, opened."""
    def at(step: int, says: str) -> None:
        set_number(page, "timeline-step", step)
        page.wait_for_function(f"document.querySelector('#timeline-info').innerText.includes('{says}')")

    at(one, f"step {one}/{steps}")
    first = page.locator("#timeline-x0 img").get_attribute("src")
    at(0, "starting noise")
    at(other, f"step {other}/{steps}")
    assert page.locator("#timeline-x0 img").get_attribute("src") != first
    page.click("#export-gif")
    link = page.locator("#export-file a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    return Image.open(download.value.path())


def test_scrub_the_timeline_and_download_an_animation(page):
    set_number(page, "steps", 8)
    page.click("#generate-txt2img")
    page.wait_for_function("document.querySelector('#timeline-info').innerText.includes('step 8/8')")
    assert scrub_and_export(page, 8, 3, 6).n_frames == 8


def picture(page, elem_id: str, n: int = 0) -> np.ndarray:
    """The pixels of the n-th picture the page shows in #elem_id, as the browser fetched them."""
    src = page.locator(f"#{elem_id} img").nth(n).get_attribute("src")
    response = page.request.get(urljoin(page.url, src))
    assert response.ok, f"{elem_id}: {src} answered {response.status}"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


INSIDE = ("inside-noise", "inside-removed", "inside-uncond", "inside-text", "inside-direction", "inside-overlay")


def test_inside_the_denoiser_follows_the_step_slider_and_the_token(page):
    """With attention recorded: noise_pred, what the step removed, the guidance pair and its difference,
    a token's map over x0 and every token's, and the guidance plot, each with content, each changing
    with the step; another token chip, another overlay."""
    page.locator("#prompt textarea").fill("a red circle on the left, blue background")  # words to map
    set_number(page, "steps", 6)
    page.locator("#record-attention input").check()
    page.click("#generate-txt2img")
    page.wait_for_function("document.querySelector('#timeline-info').innerText.includes('step 6/6')")
    set_number(page, "timeline-step", 3)
    page.wait_for_function("document.querySelector('#inside-overlay').innerText.includes('at step 3 ')")
    tokens = page.locator("#attention-token label").count()
    assert tokens > 3 and page.locator("#inside-token-grid img").count() == tokens
    before = {name: picture(page, name) for name in INSIDE}
    grid = picture(page, "inside-token-grid", 1)
    for name, pixels in [*before.items(), ("grid", grid)]:
        assert pixels.std() > 5, f"{name} is blank"
    plot = page.inner_html("#inside-guidance-plot")
    assert plot.count("<polyline") == 2 and "RMS per element" in plot and "<circle" in plot
    set_number(page, "timeline-step", 5)
    page.wait_for_function("document.querySelector('#inside-overlay').innerText.includes('at step 5 ')")
    for name in INSIDE:
        assert np.abs(picture(page, name).astype(int) - before[name]).mean() > 0.5, f"{name} did not follow the step"
    assert np.abs(picture(page, "inside-token-grid", 1).astype(int) - grid).mean() > 0.5
    assert page.inner_html("#inside-guidance-plot") != plot  # the marker moved
    overlay = picture(page, "inside-overlay")
    page.locator("#attention-token label").nth(2).click()
    page.wait_for_function("document.querySelector('#inside-overlay').innerText.includes('3 · ')")
    assert "step 5/6" in page.inner_text("#inside-update-info")
    assert np.abs(picture(page, "inside-overlay").astype(int) - overlay).mean() > 0.5
    set_number(page, "timeline-step", 4)  # the token stays picked
    page.wait_for_function("document.querySelector('#inside-overlay').innerText.includes('at step 4 ')")
    assert "3 · " in page.inner_text("#inside-overlay") and "step 4/6" in page.inner_text("#inside-update-info")
    page.click("#export-tensors")
    link = page.locator("#export-file a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    assert load_file(download.value.path())["attention"].shape[:2] == (6, tokens)  # [N, T, h, w]


def test_page_events_say_what_happened(page, tmp_path):
    page.click("#export-gif")
    page.wait_for_function("document.body.innerText.includes('Nothing to export yet: run a generation first')")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    page.locator("#load-png input[type=file]").set_input_files(str(tmp_path / "plain.png"))
    page.wait_for_function("document.querySelectorAll('.toast-body').length >= 2")
    assert "No settings loaded: this image carries no generation settings" in page.inner_text("#load-png-note")
    toasts = page.locator(".toast-body").all_inner_texts()
    assert any("No settings loaded" in text for text in toasts)
    page.click("#stop")  # nothing to stop: the page says so (Stop itself is not queued)
    page.wait_for_function("[...document.querySelectorAll('.toast-body')].some(t => t.innerText.includes("
                           "'Nothing is running.'))")


@pytest.fixture(scope="module")
def models_url(tiny_families, tmp_path_factory):
    """The app on a --models-dir of the tiny SD (first, the start model), the tiny Flux, and a Flux folder
    without weights (listed, fails when picked)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "1-sd").symlink_to(tiny_families("sd"))
    (folder / "2-flux").symlink_to(tiny_families("flux"))
    (folder / "3-empty").mkdir()
    (folder / "3-empty" / layout.MODEL_INDEX).write_text((tiny_families("flux") / layout.MODEL_INDEX).read_text())
    demo = app_module.create_demo(app_module.parse_args(["--models-dir", str(folder)]), ModelCache(device="cpu"))
    demo.launch(prevent_thread_lock=True, **app_module.launch_options("127.0.0.1", free_port()))
    yield demo.local_url
    demo.close()


def pick_model(page, label: str) -> None:
    page.locator("#model-picker input").click()
    page.get_by_role("option", name=label).click()


def test_switch_checkpoints_from_the_models_folder(browser, models_url, request):
    """SD -> Flux: the negative prompt box goes, guidance is labelled distilled, the depth tab explains
    itself; a Flux run streams every step; back to SD, the negative prompt box returns."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(30_000)
    try:
        page.goto(models_url)
        page.wait_for_selector("#generate-txt2img")
        assert page.locator("#negative-prompt").is_visible()
        pick_model(page, "2-flux (Flux.1)")
        page.wait_for_selector("#negative-prompt", state="hidden")
        assert "Distilled guidance" in page.inner_text("#guidance")
        set_number(page, "steps", 3)
        page.click("#generate-txt2img")
        page.wait_for_selector("#final-image img")
        page.wait_for_function("document.querySelector('#status').innerText.includes('step 3/3')")
        assert gallery_count(page) == 3
        assert "distilled guidance 3.5" in page.inner_text("body")
        page.wait_for_function("document.querySelector('#timeline-info').innerText.includes('noise level σ=')")
        assert page.locator("#timeline-channels img").count() == 16
        page.get_by_role("tab", name="depth").click()
        page.wait_for_function("document.body.innerText.includes('runs txt2img, img2img, not depth2img')")
        assert not page.locator("#generate-depth2img").is_visible()
        # a model that fails to load: the page says why, the picker goes back, no control shows an error
        pick_model(page, "3-empty (Flux.1)")
        page.wait_for_function("document.body.innerText.includes(\"This page stays on '2-flux (Flux.1)'\")")
        page.wait_for_function("document.querySelector('#model-picker input').value === '2-flux (Flux.1)'")
        assert page.locator("#negative-prompt").is_hidden() and "Distilled guidance" in page.inner_text("#guidance")
        # Gradio marks an event's outputs that failed with an "Error" label in their status tracker
        errors = page.evaluate("[...document.querySelectorAll('span.error')].filter(e => !e.closest('.toast-wrap'))"
                               ".map(e => e.innerText)")
        assert errors == [], errors
        pick_model(page, "1-sd (SD 1.x/2.x)")
        page.wait_for_selector("#negative-prompt", state="visible")
        assert "Guidance scale (CFG)" in page.inner_text("#guidance")
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=SHOTS / f"{request.node.name}.png", full_page=True)
        page.close()
