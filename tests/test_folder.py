"""Discovery accounts for every file: links, loops, unlistable folders, odd names."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest

import pneumoedge
from pneumoedge.runtime import folder as folder_module
from pneumoedge.runtime.folder import discover, run_folder
from pneumoedge.runtime.results import ResultWriter
from tests.conftest import gradient_image


def _kinds(root: Path, **kwargs) -> dict[str, tuple[str, str]]:
    return {str(p.relative_to(root)): (kind, reason) for p, kind, reason in discover([root], **kwargs)}


def test_links_loops_and_odd_names(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "déjà vu").mkdir(parents=True)
    cv2.imwrite(str(root / "déjà vu" / "écho thorax 1.png"), gradient_image(20, 20, 1))
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "self.png").symlink_to(root / "self.png")  # a link to itself
    (root / "README").write_text("x")
    found = _kinds(root)
    assert found["déjà vu/écho thorax 1.png"] == ("image", "")
    assert found["loop"] == ("skipped", "link to a folder, not followed")
    assert found["self.png"][0] == "image"  # tried, and the decoder says why it fails
    assert found["README"] == ("skipped", "not an image file (no suffix)")
    with pytest.raises(pneumoedge.ImageError):
        pneumoedge.preprocess(root / "self.png", pneumoedge.PreprocessSpec())


def test_non_recursive_lists_subfolders(image_folder: Path) -> None:
    found = _kinds(image_folder, recursive=False)
    assert found["sub"][0] == "skipped"
    assert not any(name.startswith("sub/") for name in found)


def test_unlistable_folder_becomes_an_error_row(bundle_dir: Path, image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    real_walk = os.walk

    def flaky_walk(top, onerror=None, **kwargs):
        for entry in real_walk(top, onerror=onerror, **kwargs):
            yield entry
            if entry[0] == str(image_folder):
                onerror(PermissionError(13, "Permission denied", str(image_folder / "sub")))
                entry[1].remove("sub")

    monkeypatch.setattr(folder_module.os, "walk", flaky_walk)
    out = tmp_path / "r.csv"
    model = pneumoedge.load(bundle_dir)
    writer = ResultWriter("csv", model.labels, [m.name for m in model.members])
    summary = run_folder(model, [image_folder], writer=writer, out=out)
    text = out.read_text()
    assert f"{image_folder / 'sub'},error" in text and "cannot list folder: Permission denied" in text
    assert summary.errors == 1 and summary.ok == 3 and summary.exit_code == 1


def test_output_inside_input_folder_is_not_an_input(bundle_dir: Path, image_folder: Path) -> None:
    out = image_folder / "results.csv"
    model = pneumoedge.load(bundle_dir)
    writer = ResultWriter("csv", model.labels, [m.name for m in model.members])
    summary = run_folder(model, [image_folder], writer=writer, out=out)
    assert summary.ok == 6 and summary.skipped == 0
    assert "results.csv" not in out.read_text()


class _ReversingEngine:
    """A second engine: the same predict_many, rows handed back in reverse order, one path made an error."""

    def __init__(self, model) -> None:
        self.model = model
        self.provider = "test-engine"
        self.closed = False
        self.seen: list[Path] = []

    def predict(self, paths, *, explain=False, postprocess=None):
        self.seen = list(paths)
        rows = list(self.model.predict_many(self.seen[1:], batch_size=2, explain=explain, postprocess=postprocess))
        rows.append(pneumoedge.Prediction(source=str(self.seen[0]), status="error", error="worker crashed twice"))
        return iter(reversed(rows))

    def close(self) -> None:
        self.closed = True


def test_any_engine_gets_the_same_rows_resume_and_progress(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    from pneumoedge.runtime.engine import Engine

    model = pneumoedge.load(bundle_dir)
    (image_folder / "notes.txt").write_text("not an image")
    local_out, other_out = tmp_path / "local.jsonl", tmp_path / "other.jsonl"
    run_folder(model, [image_folder], writer=ResultWriter("jsonl", model.labels, [m.name for m in model.members]), out=local_out)
    engine = _ReversingEngine(model)
    assert isinstance(engine, Engine)
    calls: list[tuple[int, object]] = []
    summary = run_folder(
        engine, [image_folder], writer=ResultWriter("jsonl", model.labels, [m.name for m in model.members]),
        out=other_out, progress=lambda rows, total, _: calls.append((rows, total)),
    )
    assert engine.closed and all(p.suffix != ".txt" for p in engine.seen)  # the engine only sees images
    assert summary.provider == "test-engine" and summary.errors == 1 and summary.skipped == 1 and summary.exit_code == 1
    assert calls[0] == (0, 7) and calls[-1] == (7, 7) and len(calls) == 8

    def rows(path: Path) -> dict[str, dict]:
        import json

        return {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}

    local, other = rows(local_out), rows(other_out)
    assert local.keys() == other.keys()
    crashed = str(engine.seen[0])
    assert other[crashed]["status"] == "error" and other[crashed]["error"] == "worker crashed twice"
    for path in local.keys() - {crashed}:
        assert {k: v for k, v in other[path].items() if k != "provider"} == {k: v for k, v in local[path].items() if k != "provider"}
    # --resume with the local engine runs only the errored file again
    summary = run_folder(model, [image_folder], writer=ResultWriter("jsonl", model.labels, [m.name for m in model.members]), out=other_out, resume=True)
    assert summary.resumed == 6 and summary.ok == 1
