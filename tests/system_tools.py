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
