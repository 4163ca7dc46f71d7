"""Whole processes: the runtime never touches TensorFlow, and a killed run resumes exactly."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2

from tests.conftest import gradient_image

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def test_import_and_infer_never_import_tensorflow(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    code = f"""
        import sys
        for name in ("tensorflow", "keras", "tf2onnx", "tf_keras"):
            sys.modules[name] = None  # any import of these now fails loudly
        import pneumoedge
        from pneumoedge.cli import app
        for args in (["--help"], ["info", {str(bundle_dir)!r}], ["infer", {str(image_folder)!r}, "-m", {str(bundle_dir)!r}, "-o", {str(out)!r}]):
            try:
                app(args, standalone_mode=False)
            except SystemExit as exc:
                assert exc.code in (0, None), (args, exc.code)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx") and sys.modules[m] is not None)
        assert not loaded, loaded
        print("clean")
    """
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout
    assert out.read_text().count("\n") == 7  # header + 6 rows


def test_kill_9_mid_run_then_resume_gives_one_row_per_file(bundle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    ok, data = cv2.imencode(".jpeg", gradient_image(1200, 1000, 7))
    assert ok
    for i in range(400):
        (folder / f"img_{i:04d}.jpeg").write_bytes(data.tobytes())
    out = tmp_path / "r.csv"
    command = [sys.executable, "-m", "pneumoedge", "infer", str(folder), "-m", str(bundle_dir), "-o", str(out), "--batch", "1", "--workers", "1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > 40:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed; make the folder bigger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    rows_before = out.read_bytes().count(b"\n") - 1
    assert 0 < rows_before < 400

    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [r["path"] for r in rows]
    assert len(paths) == 400 and len(set(paths)) == 400
    assert all(r["status"] == "ok" for r in rows)
    assert "kept from earlier run" in resumed.stderr
