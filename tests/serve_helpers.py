"""Starting and stopping the real `pneumoedge serve` process on a free loopback port, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(*args: str, log_path: Path, timeout_s: float = 60.0, env: Optional[dict] = None) -> tuple[subprocess.Popen, str]:
    """`python -m pneumoedge serve --port FREE ARGS`, returned once /readyz answers 200."""
    port = free_port()
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumoedge", "serve", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise AssertionError(f"serve did not become ready in {timeout_s:g} s: {log_path.read_text(errors='replace')}")


def stop_server(process: subprocess.Popen) -> int:
    """SIGINT (as Ctrl-C), then SIGKILL if it lingers; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode
