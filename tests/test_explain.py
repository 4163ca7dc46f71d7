"""Heatmaps at run time (no TensorFlow): geometry back onto the image, ensembles, overlays, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import pneumoedge
from pneumoedge.bundle import MemberSource, write_bundle
from pneumoedge.cli import app
from pneumoedge.explain.maps import combine, normalise, to_input_grid
from pneumoedge.preprocessing import PreprocessSpec
from tests.conftest import SPEC_GRAY, gradient_image
from tests.explain_models import EXPLAIN, blob_image, map_model
from tests.onnx_models import mean_model

ROOT = Path(__file__).resolve().parent.parent
BOX = (30, 80, 20, 70)  # y0, y1, x0, x1 of the bright blob in a 300 x 200 image
runner = CliRunner()


@pytest.fixture
def blob_png(tmp_path: Path) -> Path:
    path = tmp_path / "blob.png"
    cv2.imwrite(str(path), blob_image(300, 200, BOX))
    return path


@pytest.fixture
def map_onnx(tmp_path: Path) -> Path:
    return map_model(tmp_path / "map.onnx", SPEC_GRAY, cell=4)


def _peak(heatmap: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(y), int(x)


def test_heatmap_is_on_the_original_grid_and_peaks_on_the_blob(map_onnx: Path, blob_png: Path) -> None:
    result = pneumoedge.load(map_onnx).predict(blob_png, explain=True)
    heat = result.heatmap
    assert heat is not None and heat.shape == (300, 200) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.5
    y, x = _peak(heat)
    assert BOX[0] <= y < BOX[1] and BOX[2] <= x < BOX[3]
    # Far from the blob the map is low: the stretch to 32x32 was undone, not just resized.
    assert heat[250:, 150:].max() < 0.2
    assert result.explanation.sources == {"map": "fp32 graph"}


def test_reduced_jpeg_decode_maps_back_to_the_files_full_size(tmp_path: Path) -> None:
    spec = PreprocessSpec(height=32, width=32, color="gray", resize="area", decode_reduction=4)
    model = map_model(tmp_path / "r.onnx", spec, cell=4)
    image = blob_image(803, 601, (500, 700, 350, 550))
    path = tmp_path / "big.jpeg"
    cv2.imwrite(str(path), image)
    result = pneumoedge.load(model).predict(path, explain=True)
    assert result.heatmap.shape == (803, 601)
    y, x = _peak(result.heatmap)
    assert 500 <= y < 700 and 350 <= x < 550
    assert result.explanation.display.shape == (201, 151)  # the decode the classifier used


def test_feature_grid_cells_map_to_the_input_pixels_they_cover() -> None:
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0
    # 18 cells from a 150 px input: stride 8 covers 144 px, the rest is padded from the edge.
    up = to_input_grid(np.pad(cam, ((0, 14), (0, 14))), 150, 150)
    assert up.shape == (150, 150)
    assert up[:8, 24:32].mean() > 0.5 and up[:8, 40:].max() < 1e-6
    assert normalise(np.zeros((3, 3))).max() == 0.0  # an empty map stays empty, no division by zero


def test_ensemble_averages_normalised_maps_with_weights_across_input_sizes(tmp_path: Path, blob_png: Path) -> None:
    spec_b = PreprocessSpec(height=24, width=40, color="rgb", resize="bilinear")
    bright = map_model(tmp_path / "bright.onnx", SPEC_GRAY, cell=4)
    dark = map_model(tmp_path / "dark.onnx", spec_b, cell=8, sign=-1.0, shift=1.0)  # highlights the background
    bundle = write_bundle(
        tmp_path / "b",
        [MemberSource(bright, "bright", SPEC_GRAY, weight=1.0, explain=EXPLAIN), MemberSource(dark, "dark", spec_b, weight=3.0, explain=EXPLAIN)],
        labels=("NORMAL", "PNEUMONIA"),
        threshold=0.5,
    )
    model = pneumoedge.load(bundle.root)
    result = model.predict(blob_png, explain=True)
    grid = result.explanation.grid_map
    maps = [m.run_explained(np.stack([pneumoedge.preprocess(blob_png, m.card.spec)]))[1][0] for m in model.members]
    expected = combine(maps, [(32, 32), (24, 40)], [1.0, 3.0], grid.shape)
    np.testing.assert_allclose(grid, expected, atol=1e-6)
    # The dark member weighs three times more: the blob is the coolest place of the average.
    on_blob = result.heatmap[BOX[0] + 10 : BOX[1] - 10, BOX[2] + 10 : BOX[3] - 10].mean()
    assert on_blob < result.heatmap[200:, 100:].mean()


def test_plain_prediction_has_no_heatmap_and_overlay_says_why(map_onnx: Path, blob_png: Path) -> None:
    result = pneumoedge.load(map_onnx).predict(blob_png)
    assert result.explanation is None and result.heatmap is None
    with pytest.raises(ValueError, match="no heatmap"):
        result.overlay()
    explained = pneumoedge.load(map_onnx).predict(blob_png, explain=True)
    assert explained.probabilities == result.probabilities  # explaining changes no number


def test_empty_map_is_an_answer_and_leaves_the_image_uncoloured(tmp_path: Path, blob_png: Path) -> None:
    never = map_model(tmp_path / "never.onnx", SPEC_GRAY, shift=-10.0)  # ReLU of negative values: all zero
    result = pneumoedge.load(never).predict(blob_png, explain=True)
    assert result.explanation.empty and float(result.heatmap.max()) == 0.0
    overlay = result.overlay(max_side=600)
    picture = overlay[:400]  # 300 x 200 is enlarged to 400 x 267 for legibility
    assert np.array_equal(picture[:, :, 0], picture[:, :, 1]) and np.array_equal(picture[:, :, 1], picture[:, :, 2])


def test_overlay_colours_where_the_map_is_high_and_keeps_grey_elsewhere(map_onnx: Path, blob_png: Path) -> None:
    overlay = pneumoedge.load(map_onnx).predict(blob_png, explain=True).overlay(max_side=600)
    assert overlay.dtype == np.uint8 and overlay.ndim == 3 and overlay.shape[1] == 267  # enlarged to 400 x 267
    assert overlay.shape[0] > 400  # the text band under the image
    scale = 400 / 300
    on_blob = overlay[int(55 * scale), int(45 * scale)].astype(int)
    far = overlay[int(280 * scale), int(180 * scale)].astype(int)
    assert np.ptp(on_blob) > 20  # coloured
    assert np.ptp(far) == 0  # grey


def test_model_without_heatmaps_says_so_everywhere(tmp_path: Path, blob_png: Path) -> None:
    plain = mean_model(tmp_path / "plain.onnx", SPEC_GRAY)
    model = pneumoedge.load(plain)
    assert not model.can_explain and "not available" in model.explain_note
    assert model.predict(blob_png, explain=True).explanation is None
    result = runner.invoke(app, ["infer", str(blob_png), "-m", str(plain), "--heatmaps", str(tmp_path / "h")])
    assert result.exit_code == 2 and "not available" in result.output
    result = runner.invoke(app, ["explain", str(blob_png), "-m", str(plain), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "not available" in result.output and not (tmp_path / "o.png").exists()


def test_infer_heatmaps_writes_one_overlay_per_classified_image(map_onnx: Path, image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "notes.txt").write_text("not an image")
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out, heat = tmp_path / "r.csv", tmp_path / "overlays"
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(map_onnx), "-o", str(out), "--heatmaps", str(heat), "--overlay-size", "256"])
    assert result.exit_code == 1, result.output  # the broken PNG
    rows = list(csv.DictReader(out.open()))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6
    for row in ok:
        overlay = Path(row["overlay"])
        assert overlay.is_file() and overlay.parent.is_relative_to(heat)
        relative = Path(row["path"]).relative_to(image_folder)
        assert overlay == heat / relative.parent / f"{relative.name}.png"
        assert max(cv2.imread(str(overlay)).shape[:2]) >= 256
    assert all(r["overlay"] == "" for r in rows if r["status"] != "ok")
    assert len(list(heat.rglob("*.png"))) == 6
    # --resume keeps the finished rows and their overlays, and writes none again.
    before = {p: p.stat().st_mtime_ns for p in heat.rglob("*.png")}
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(map_onnx), "-o", str(out), "--heatmaps", str(heat), "--resume"])
    assert {p: p.stat().st_mtime_ns for p in heat.rglob("*.png")} == before
    assert sum(1 for r in csv.DictReader(out.open()) if r["status"] == "ok") == 6


def test_explain_verb_writes_the_overlay_and_refuses_to_overwrite(map_onnx: Path, blob_png: Path, tmp_path: Path) -> None:
    target = tmp_path / "o.png"
    result = runner.invoke(app, ["explain", str(blob_png), "-m", str(map_onnx), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "overlay" in result.output and cv2.imread(str(target)) is not None
    result = runner.invoke(app, ["explain", str(blob_png), "-m", str(map_onnx), "-o", str(target)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(app, ["explain", str(tmp_path / "missing.png"), "-m", str(map_onnx), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.parametrize("heatmap_from, peak_on_blob", [("fp32", True), ("int8", False)])
def test_int8_member_maps_come_from_the_graph_its_export_check_chose(tmp_path: Path, blob_png: Path, heatmap_from: str, peak_on_blob: bool) -> None:
    fp32 = map_model(tmp_path / "f.onnx", SPEC_GRAY)
    # Stands in for an int8 graph whose maps failed (or passed) the check against fp32.
    int8 = map_model(tmp_path / "q.onnx", SPEC_GRAY, sign=-1.0, shift=1.0)
    checked = {**EXPLAIN, "int8_check": {"min_correlation": 0.5 if heatmap_from == "fp32" else 0.999, "heatmap_from": heatmap_from}}
    bundle = write_bundle(
        tmp_path / "b",
        [MemberSource(fp32, "m", SPEC_GRAY, "fp32", explain=EXPLAIN), MemberSource(int8, "m", SPEC_GRAY, "int8", explain=checked)],
        labels=("NORMAL", "PNEUMONIA"),
        threshold=0.5,
    )
    model = pneumoedge.load(bundle.root, precision="int8")
    result = model.predict(blob_png, explain=True)
    y, x = _peak(result.heatmap)
    assert (BOX[0] <= y < BOX[1] and BOX[2] <= x < BOX[3]) == peak_on_blob
    assert model.map_sources()["m"].startswith(f"{heatmap_from} graph")


def test_explained_folder_run_never_imports_tensorflow(map_onnx: Path, image_folder: Path, tmp_path: Path) -> None:
    code = f"""
        import sys
        for name in ("tensorflow", "keras", "tf2onnx"):
            sys.modules[name] = None
        from pneumoedge.cli import app
        for args in (["infer", {str(image_folder)!r}, "-m", {str(map_onnx)!r}, "-o", {str(tmp_path / 'r.jsonl')!r}, "--heatmaps", {str(tmp_path / 'h')!r}],):
            try:
                app(args, standalone_mode=False)
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        print("clean")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(Path(r["overlay"]).is_file() for r in rows if r["status"] == "ok") and len(rows) == 6


def test_gradient_images_give_finite_maps(map_onnx: Path, tmp_path: Path) -> None:
    arrays = [gradient_image(64, 48, seed) for seed in range(4)] + [np.zeros((40, 40), np.uint8)]
    for result in pneumoedge.load(map_onnx).predict_many(arrays, explain=True, batch_size=2):
        assert result.status == "ok" and np.isfinite(result.heatmap).all()


def test_dicom_overlay_shows_the_image_through_the_classifiers_voi(map_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from pneumoedge.imageio import read_pixels
    from tests.input_files import dicom_bytes

    stored = (blob_image(120, 100, (20, 50, 10, 40)).astype(np.uint16) * 16)  # 12-bit values
    data = dicom_bytes(stored, photometric="MONOCHROME1", bits_stored=12, WindowCenter=2000, WindowWidth=2000)
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    result = pneumoedge.load(map_onnx).predict(path, explain=True)
    rendered = read_pixels(data)  # the classifier's view: window applied, MONOCHROME1 inverted
    np.testing.assert_array_equal(result.explanation.display, np.clip(np.rint(rendered), 0, 255).astype(np.uint8))
    assert result.heatmap.shape == (120, 100)
    # MONOCHROME1 inverts: the stored bright blob is dark as shown, so the brightness map avoids it.
    y, x = _peak(result.heatmap)
    assert not (20 <= y < 50 and 10 <= x < 40)


@pytest.mark.parametrize("orientation, expected", [(1, (1580, 1579)), (6, (1579, 1580))])
def test_original_size_of_reduced_jpegs_near_square_and_exif_turned(tmp_path: Path, orientation: int, expected: tuple) -> None:
    from tests.test_inputs import exif_jpeg

    spec = PreprocessSpec(height=32, width=32, color="gray", resize="area", decode_reduction=4)
    model = pneumoedge.load(map_model(tmp_path / "r.onnx", spec))
    path = tmp_path / "x.jpeg"
    path.write_bytes(exif_jpeg(blob_image(1580, 1579, (100, 400, 100, 400)), orientation))  # a 1/4 decode is square
    assert model.predict(path, explain=True).heatmap.shape == expected
