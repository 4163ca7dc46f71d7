"""Skips for tests that need a system program (Chromium, Orthanc, dcmtk, dciodvfy): skip locally, fail in CI.

`.ci/run` sets PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS=1, so in CI a missing tool fails the test
instead of skipping it (an all-skipped run would otherwise pass).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import pytest


def require_program(name: str, *, install_hint: str) -> str:
    """The path of program `name`; skip with the reason (or fail under CI) when it is missing."""
    path: Optional[str] = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed ({install_hint})"
    if os.environ.get("PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(f"{reason}; PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS=1 forbids skipping", pytrace=False)
    pytest.skip(reason)
    raise AssertionError("unreachable")


#: Debian's Chromium as root, headless, with no look-ups or background traffic off this machine.
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


def require_playwright():
    """playwright.sync_api; a skip locally without it, a failure under CI (it is in the [dev] extra)."""
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        if os.environ.get("PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail("Playwright is not installed (pip install '.[dev]'); CI forbids skipping the browser tests", pytrace=False)
        pytest.skip("Playwright is not installed (pip install '.[dev]')")
    return sync_api
