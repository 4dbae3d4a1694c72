"""The History in a real browser (test_browser.py's Chromium): runs saved, listed after a restart,
reopened into the Inspect timeline; on a shared deployment each browser sees only its own runs."""

import pytest


from .test_browser import SHOTS, browser, scrub_and_export, set_number  # noqa: F401 - browser: a fixture


@pytest.fixture
def serve(serve_tiny, tmp_path):
    """serve(*flags): the app on the tiny model saving in tmp_path/outputs; closed after the test."""
    return lambda *flags: serve_tiny("--outputs", str(tmp_path / "outputs"), *flags)


@pytest.fixture
def pages(browser, request):  # noqa: F811 - the imported fixture
    """pages(url, own=False): a page on `url`; `own`: in a browser context of its own (its own
    localStorage: another user). Screenshots the pages still open when the test fails."""
    opened, contexts = [], []

    def open_page(url, own=False):
        viewport = {"width": 1400, "height": 1400}
        if own:
            contexts.append(browser.new_context(viewport=viewport))
        page = contexts[-1].new_page() if own else browser.new_page(viewport=viewport)
        page.set_default_timeout(30_000)
        page.goto(url)
        page.wait_for_selector("#generate-txt2img")
        opened.append(page)
        return page

    yield open_page
    report = getattr(request.node, "rep_call", None)
    for n, page in enumerate(p for p in opened if not p.is_closed()):
        if report is None or report.failed:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=SHOTS / f"{request.node.name}-{n}.png", full_page=True)
        page.close()
    for context in contexts:
        context.close()


def run(page, seed: int, listed: int) -> None:
    """One 3-step run with `seed`; waits until the History lists `listed` runs."""
    set_number(page, "seed", seed)
    set_number(page, "steps", 3)
    page.click("#generate-txt2img")
    page.wait_for_function(f"document.querySelectorAll('#history-gallery img').length === {listed}")


def captions(page) -> list[str]:
    return page.locator("#history-gallery .caption-label").all_inner_texts()


def test_three_runs_a_restart_then_the_history_reopens_a_past_run(serve, pages):
    demo = serve()
    page = pages(demo.local_url)
    for n, seed in enumerate((11, 12, 13), 1):
        run(page, seed, n)
    page.close()
    demo.close()

    page = pages(serve().local_url)  # the restart: a new app over the same outputs folder
    page.wait_for_function("document.querySelectorAll('#history-gallery img').length === 3")
    assert [c.split(" · ", 1)[1] for c in captions(page)] == ["txt2img · seed 13", "txt2img · seed 12",
                                                              "txt2img · seed 11"]  # newest first
    page.locator("#history-gallery img").nth(1).click()
    page.wait_for_function("document.querySelector('#history-info').innerText.includes('seed 12')")
    page.click("#history-open")
    page.wait_for_function("document.querySelector('#timeline-info').innerText.includes('step 3/3')")
    assert "seed 12 · 3 steps" in page.locator("#timeline-run input").input_value()
    assert scrub_and_export(page, 3, 1, 2).n_frames == 3
    # the search and the filters
    page.locator("#history-search textarea, #history-search input").first.fill("nothing like it")
    page.locator("#history-search textarea, #history-search input").first.press("Enter")
    page.wait_for_function("document.querySelector('#history-info').innerText.includes('No saved run matches')")
    assert page.locator("#history-gallery img").count() == 0


def test_on_a_shared_deployment_each_browser_sees_only_its_own_runs(serve, pages):
    url = serve("--share").local_url  # a public link (launched here without one): per-user history
    ann, bob = pages(url, own=True), pages(url, own=True)
    run(ann, 21, 1)
    run(bob, 22, 1)
    assert [c.split(" · ", 1)[1] for c in captions(bob)] == ["txt2img · seed 22"]
    ann.click("#history-refresh")
    ann.wait_for_function("document.querySelector('#history-info').innerText.includes('1 run')")
    assert [c.split(" · ", 1)[1] for c in captions(ann)] == ["txt2img · seed 21"]
    ann.reload()  # the browser keeps its key: the same runs after a reload
    ann.wait_for_function("document.querySelectorAll('#history-gallery img').length === 1")
    assert [c.split(" · ", 1)[1] for c in captions(ann)] == ["txt2img · seed 21"]
