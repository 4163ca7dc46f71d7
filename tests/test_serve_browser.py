"""The page driven as a person would: the real `pneumoedge serve` process, Debian's Chromium, Playwright.

Skips only where Chromium is not installed, and fails instead under CI (tests/system_tools.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from typer.testing import CliRunner

from pneumoedge.bundle import read_manifest
from pneumoedge.runtime.loading import default_bundle_path
from tests.serve_helpers import EXAMPLES, REPO, start_server, stop_server
from tests.system_tools import CHROMIUM_ARGS, require_playwright, require_program

TOKEN = "browser-token-0123456789abcdef"


def _document_image(path: Path) -> Path:
    """A scanned form (pneumoedge's own foreign-image generator): nothing like a chest X-ray."""
    import cv2
    import numpy as np

    from pneumoedge.datasets.foreign import render_foreign

    pixels = render_foreign(np.random.default_rng(1), "document", 512, 512)
    assert cv2.imwrite(str(path), pixels)
    return path


def _no_accessibility_violations(page, where: str) -> None:
    """axe-core (through axe-playwright-python, in the [dev] extra) finds no violation on the page."""
    try:
        from axe_playwright_python.sync_playwright import Axe
    except ImportError:
        if os.environ.get("PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail("axe-playwright-python is not installed (pip install '.[dev]'); CI forbids skipping", pytrace=False)
        return  # the rest of the browser test still runs
    results = Axe().run(page)
    assert results.violations_count == 0, f"axe-core on {where}:\n{results.generate_report()}"


def _infer_label(image: Path, tmp_path: Path) -> dict:
    """`pneumoedge infer` on the same file, in its own process, as a user would run it."""
    out = tmp_path / "infer.jsonl"
    subprocess.run([sys.executable, "-m", "pneumoedge", "infer", str(image), "--out", str(out)], check=True, cwd=REPO, capture_output=True)
    return json.loads(out.read_text().splitlines()[0])


def test_page_in_chromium_gives_infers_label_and_reports_bad_files(tmp_path: Path) -> None:
    chromium = require_program("chromium", install_hint="apt-get install -y --no-install-recommends chromium chromium-driver")
    playwright = require_playwright()
    image = EXAMPLES / "example_01.jpeg"
    expected = _infer_label(image, tmp_path)
    fake = tmp_path / "letter.png"
    fake.write_bytes(b"%PDF-1.4\n% a letter, named like an image\n")
    document = _document_image(tmp_path / "scanned_form.png")  # the default bundle flags it: unlike its training images
    process, url = start_server("--host", "127.0.0.1", log_path=tmp_path / "serve.log", env={"PNEUMOEDGE_SERVE_TOKEN": TOKEN})
    requests: list[str] = []
    console_errors: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(http_credentials={"username": "radiographer", "password": TOKEN}, viewport={"width": 1200, "height": 900})
                page = context.new_page()
                page.on("request", lambda r: requests.append(r.url))
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: console_errors.append(f"uncaught: {e}"))
                page.goto(url + "/")
                # The model's identity and the notice are there before anything is uploaded.
                expect = playwright.expect  # locator waits: the CSP forbids evaluating strings in the page
                expect(page.locator("#model-name")).not_to_have_text("loading…", timeout=15000)
                identity = page.locator("#model-identity").inner_text()
                manifest = read_manifest(default_bundle_path())
                # The members that run: precision "auto" picks int8 on a VNNI machine, fp32 elsewhere.
                assert manifest.name in identity and any(
                    all(f"{m.name}: {m.sha256[:12]}" in identity for m in manifest.members_for(precision))
                    for precision in manifest.precisions
                )
                assert "synthetic phantoms" in identity
                assert "Decision support, not a diagnosis." in page.locator("header").inner_text()
                # Choose the files by the input's label, as a screen reader user would find it.
                page.get_by_label("Choose X-ray images").set_input_files([str(image), str(fake), str(document)])
                items = page.locator("#results > li")
                expect(items).to_have_count(3)
                expect(page.locator("#results [data-status=pending]")).to_have_count(0, timeout=60000)
                good, bad, foreign = items.nth(0), items.nth(1), items.nth(2)
                assert good.get_attribute("data-status") == "ok"
                label_text = good.locator(".label").inner_text()
                assert label_text.split(" ")[0] == expected["label"]
                assert f"{100 * expected['probability']:.1f} %" in label_text
                assert good.locator(".bar-row").count() == 2
                if expected["disagreement"] >= 0.2:
                    assert "disagree" in good.inner_text()
                assert good.locator("img").first.get_attribute("alt") == "Preview of example_01.jpeg"
                assert bad.get_attribute("data-status") == "error"
                assert "PDF" in bad.locator("[role=alert]").inner_text()
                expect(page.locator("#progress")).to_have_text("3 of 3 images done")
                # Finding 6: out of distribution, the warning leads and the label is secondary.
                assert good.locator(".ood-warning").count() == 0
                assert foreign.get_attribute("data-status") == "ok"
                first = foreign.locator(".body > :nth-child(2)")  # right under the file name
                expect(first).to_have_class("ood-warning")
                expect(first).to_have_text("Unlike this model's training images: do not rely on this result.")
                assert foreign.locator(".label").get_attribute("class") == "label secondary"
                assert "for reference only" in foreign.locator(".label").inner_text()
                warning_size = float(first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
                label_size = float(foreign.locator(".label").evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
                assert label_size < warning_size and good.locator(".label").evaluate("e => getComputedStyle(e).fontWeight") == "700"
                assert foreign.locator(".label").evaluate("e => getComputedStyle(e).fontWeight") == "400"
                _no_accessibility_violations(page, "desktop")
                page.set_viewport_size({"width": 375, "height": 740})  # a phone
                foreign.locator("h3").scroll_into_view_if_needed()
                card_top = foreign.bounding_box()["y"]
                warning_box = first.bounding_box()
                assert warning_box["y"] + warning_box["height"] - card_top < 500, "the warning is below a phone's fold"
                _no_accessibility_violations(page, "phone")
                page.set_viewport_size({"width": 1200, "height": 900})
                screenshot = tmp_path / "serve-page.png"
                page.screenshot(path=str(screenshot), full_page=True)
                assert screenshot.stat().st_size > 10_000
                if os.environ.get("PNEUMOEDGE_SERVE_SCREENSHOT"):  # to refresh docs/serve-screenshot.png
                    shutil.copy(screenshot, os.environ["PNEUMOEDGE_SERVE_SCREENSHOT"])
            finally:
                browser.close()
    finally:
        code = stop_server(process)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert code == 0, log
    assert requests and all(r.startswith(url + "/") or r.startswith("blob:" + url) or r.startswith("data:") for r in requests), requests
    # A CSP violation or a script error would show here; the PDF's 415 is the one expected line.
    unexpected = [e for e in console_errors if "status of 415" not in e]
    assert unexpected == [], console_errors
    assert "status=200 files=1" in log and "example_01" not in log and "letter" not in log and "scanned_form" not in log


def test_heatmap_toggle_by_keyboard_on_a_model_with_heatmaps(tmp_path: Path) -> None:
    chromium = require_program("chromium", install_hint="apt-get install -y --no-install-recommends chromium chromium-driver")
    playwright = require_playwright()
    pytest.importorskip("onnx", reason="export needs the [export] extra")
    from pneumoedge.cli import app
    from tests.foreign_models import cnn

    source = cnn(tmp_path / "m.onnx", size=(64, 64), channels=3, classes=2, head="logits")
    model = tmp_path / "explained.onnx"
    args = ["export", str(source), "--out", str(model), "--size", "64", "64", "--color", "rgb", "--layout", "NCHW",
            "--labels", "NORMAL,PNEUMONIA", "--head", "logits"]
    exported = CliRunner().invoke(app, args)
    assert exported.exit_code == 0, exported.output
    import cv2

    from tests.input_files import dicom_bytes

    dicom = tmp_path / "chest.dcm"
    dicom.write_bytes(dicom_bytes(cv2.imread(str(EXAMPLES / "example_01.jpeg"), cv2.IMREAD_GRAYSCALE)))
    process, url = start_server("--model", str(model), log_path=tmp_path / "serve.log")
    problems: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
                page.goto(url + "/")
                expect = playwright.expect
                expect(page.locator("#model-explain")).to_contain_text("available:")
                expect(page.locator("#model-provenance")).to_contain_text("no provenance recorded")
                # Keyboard only: tick the box, then the result's button with Space.
                page.get_by_label("Ask for heatmaps").focus()
                page.keyboard.press("Space")
                expect(page.get_by_label("Ask for heatmaps")).to_be_checked()
                page.get_by_label("Choose X-ray images").set_input_files([str(EXAMPLES / "example_05.png"), str(dicom)])
                card = page.locator("#results > li").first
                expect(card).to_have_attribute("data-status", "ok", timeout=60000)
                button = card.get_by_role("button", name="Show heatmap")
                heatmap = card.get_by_alt_text("Heatmap: where the model looked, over the X-ray")
                expect(heatmap).to_be_hidden()
                button.focus()
                page.keyboard.press("Space")
                expect(card.get_by_role("button", name="Hide heatmap")).to_have_attribute("aria-pressed", "true")
                expect(heatmap).to_be_visible()
                expect(card.get_by_alt_text("Preview of example_05.png")).to_be_hidden()
                # Finding 7: the heatmap full size, its legend readable (the thumbnail is 12rem wide).
                card.get_by_role("button", name="View heatmap full size").click()
                dialog = page.get_by_role("dialog", name="Heatmap of example_05.png")
                expect(dialog).to_be_visible()
                large = dialog.get_by_role("img")
                expect(large).to_be_visible()
                shown = large.bounding_box()
                natural = large.evaluate("e => [e.naturalWidth, e.naturalHeight]")
                thumb = heatmap.bounding_box()
                assert shown["width"] > 2 * thumb["width"] or shown["width"] >= natural[0] - 1, (shown, natural, thumb)
                _no_accessibility_violations(page, "heatmap dialog")
                page.keyboard.press("Escape")
                expect(dialog).to_be_hidden()
                # Finding 7: a DICOM card shows "no preview" OR the heatmap, never both.
                dicom_card = page.locator("#results > li").nth(1)
                expect(dicom_card).to_have_attribute("data-status", "ok", timeout=60000)
                no_preview = dicom_card.locator(".no-preview")
                expect(no_preview).to_be_visible()
                dicom_card.get_by_role("button", name="Show heatmap").click()
                expect(dicom_card.get_by_alt_text("Heatmap: where the model looked, over the X-ray")).to_be_visible()
                expect(no_preview).to_be_hidden()
                page.screenshot(path=str(tmp_path / "heatmap.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop_server(process)
    assert problems == [], problems  # an overlay blocked by the CSP would be reported here
