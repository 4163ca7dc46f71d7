"""report.html in Debian's Chromium: self-contained (no request leaves the file), images decode, A4 print fits.

Skips only where Chromium or Playwright is missing, and fails instead under CI (tests/system_tools.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pneumoedge.datasets.phantoms import generate_dataset
from pneumoedge.runtime.loading import default_bundle_path
from pneumoedge.validation.report import validate
from tests.system_tools import CHROMIUM_ARGS, require_playwright, require_program

#: A4 at 96 CSS px per inch.
A4_WIDTH_PX = 794


def test_report_page_is_self_contained_and_prints_on_a4(tmp_path: Path) -> None:
    chromium = require_program("chromium", install_hint="apt-get install -y --no-install-recommends chromium")
    sync_api = require_playwright()
    data = generate_dataset(tmp_path / "ph", counts={"test": {"normal": 5, "bacteria": 3, "virus": 2}}, size=(160, 160), seed=4) / "test"
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), bundle)
    validate(bundle, data, tmp_path / "first", threads=1, site_threshold="fixed:0.9")
    # validated at a site threshold that misses cases, so the gallery has heatmaps to show
    result = validate(bundle, data, tmp_path / "report", threads=1, site=tmp_path / "first" / "site.json", gallery=4)
    assert result.report["gallery"]["shown"], "the test needs errors to show"
    page_path = tmp_path / "report" / "report.html"
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": A4_WIDTH_PX, "height": 1123})

            def guard(route) -> None:
                url = route.request.url
                if url.startswith("data:") or url == page_path.as_uri():
                    route.continue_()
                else:
                    outside.append(url)
                    route.abort()

            page.route("**/*", guard)
            page.goto(page_path.as_uri())
            assert outside == []
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.getAttribute('src').slice(0, 22)])")
            assert len(images) >= 3 + len(result.report["gallery"]["shown"])  # ROC, reliability, scores, heatmaps
            assert all(done and width > 0 and src.startswith("data:image/png") for done, width, src in images)
            assert page.get_by_text("never a diagnosis").first.is_visible()
            assert "Worst errors" in page.inner_text("body") and "false negative" in page.inner_text("body")
            page.emulate_media(media="print")
            assert page.evaluate("document.documentElement.scrollWidth") <= A4_WIDTH_PX
            pdf = page.pdf(format="A4", print_background=True)
            assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
        finally:
            browser.close()
