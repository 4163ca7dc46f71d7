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
