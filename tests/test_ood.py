"""Out-of-distribution statistics: the fit, the score at export and at run time, bundles, tampering."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import pneumoedge
from pneumoedge.bundle import BundleError, MemberSource, write_bundle
from pneumoedge.cli import app
from pneumoedge.export.ood_fit import graph_features, with_ood
from pneumoedge.export.onnx_run import onnx_session
from pneumoedge.runtime.ood import OodError, OodStats, combine, fit, ledoit_wolf_shrinkage
from tests.conftest import SPEC_GRAY, gradient_image
from tests.explain_models import EXPLAIN, map_model

runner = CliRunner()


def test_fit_flags_about_one_percent_of_held_out_in_distribution_samples() -> None:
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 3.0, 16)
    stats, meta = fit(rng.normal(size=(2000, 16)) * scale, seed=1)
    fresh = rng.normal(size=(5000, 16)) * scale
    rate = float(np.mean(stats.distances(fresh) >= stats.threshold))
    assert 0.002 <= rate <= 0.03
    assert meta["reference_images"] == 1600 and meta["heldout_images"] == 400 and meta["features"] == 16
    far = np.full((1, 16), 6.0) * scale
    assert stats.distances(far)[0] > 2 * stats.threshold


def test_wide_features_and_few_images_still_give_a_finite_usable_score() -> None:
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(5, 256))
    reference = rng.normal(size=(40, 5)) @ basis + 0.01 * rng.normal(size=(40, 256))  # 40 images, 256 features
    stats, meta = fit(reference)
    assert 0.0 < meta["shrinkage"] <= 1.0 and np.isfinite(stats.precision).all()
    novel = reference[:3] + 3.0 * rng.normal(size=(3, 256))  # moves along directions never seen
    assert (stats.distances(novel) > stats.threshold).all()


def test_shrinkage_is_small_with_plenty_of_data_and_large_with_scarce_data() -> None:
    rng = np.random.default_rng(2)
    many = rng.normal(size=(20000, 4)) * np.array([1.0, 3.0, 0.3, 10.0])  # far from the identity target
    scarce = rng.normal(size=(12, 50)) * np.linspace(0.5, 2.0, 50)
    assert ledoit_wolf_shrinkage(many - many.mean(0)) < 0.01
    assert ledoit_wolf_shrinkage(scarce - scarce.mean(0)) > 0.5
    isotropic = rng.normal(size=(5000, 4))  # the target is the truth: shrink all the way
    assert ledoit_wolf_shrinkage(isotropic - isotropic.mean(0)) > 0.9


def test_fit_refuses_what_cannot_be_fitted() -> None:
    with pytest.raises(OodError, match="at least 10"):
        fit(np.zeros((5, 3)))
    with pytest.raises(OodError, match="do not vary"):
        fit(np.ones((20, 3)))
    with pytest.raises(OodError, match="NaN"):
        fit(np.full((20, 3), np.nan))


def test_statistics_survive_saving_bit_for_bit(tmp_path: Path) -> None:
    stats, _ = fit(np.random.default_rng(3).normal(size=(50, 6)))
    loaded = OodStats.load(stats.save(tmp_path / "s.npz"))
    assert np.array_equal(loaded.mean, stats.mean) and np.array_equal(loaded.precision, stats.precision)
    assert loaded.threshold == stats.threshold
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OodError, match="unreadable"):
        OodStats.load(tmp_path / "bad.npz")


def test_ensemble_score_is_the_weighted_mean_of_distance_ratios() -> None:
    assert combine([2.0, 9.0], [4.0, 3.0], [1.0, 3.0]) == pytest.approx((0.5 * 1 + 3.0 * 3) / 4)


@pytest.fixture
def reference_images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "reference"
    folder.mkdir()
    paths = []
    for seed in range(60):
        path = folder / f"r{seed:02d}.png"
        cv2.imwrite(str(path), gradient_image(64, 64, seed))
        paths.append(path)
    return paths


@pytest.fixture
def ood_bundle(tmp_path: Path, reference_images: list[Path]) -> Path:
    model = map_model(tmp_path / "m.onnx", SPEC_GRAY)
    sources, summary = with_ood([MemberSource(model, "m", SPEC_GRAY, explain=EXPLAIN)], reference_images, tmp_path, described="60 test images")
    assert summary["available"] and summary["fp32"]["reference_images"] == 48
    write_bundle(tmp_path / "ood_bundle", sources, labels=("NORMAL", "PNEUMONIA"), threshold=0.5, name="ood-test")
    return tmp_path / "ood_bundle"


def test_score_at_run_time_equals_the_score_at_export_bit_for_bit(ood_bundle: Path, reference_images: list[Path]) -> None:
    model = pneumoedge.load(ood_bundle)
    stats = OodStats.load(ood_bundle / "m.fp32.ood.npz")
    features = graph_features([onnx_session(ood_bundle / "m.fp32.onnx")], reference_images[:8], SPEC_GRAY, batch=8)[0]
    at_export = stats.distances(features) / stats.threshold
    at_runtime = [r.ood_score for r in model.predict_many(reference_images[:8], batch_size=8)]
    assert at_runtime == at_export.tolist()


def test_images_unlike_the_reference_are_flagged_and_alike_ones_are_not(ood_bundle: Path, tmp_path: Path) -> None:
    model = pneumoedge.load(ood_bundle)
    assert model.can_flag_ood and "48 images" in model.ood_note
    alike = [gradient_image(64, 64, seed) for seed in range(100, 140)]
    checkerboard = ((np.indices((64, 64)) // 16).sum(axis=0) % 2 * 255).astype(np.uint8)  # hard-edged tiles
    foreign = [np.full((64, 64), 255, np.uint8), np.zeros((64, 64), np.uint8), checkerboard]
    flagged_alike = sum(r.ood for r in model.predict_many(alike))
    assert flagged_alike <= 2  # 99th percentile of held-out references: rare false alarms
    assert all(r.ood and r.ood_score > 1.0 for r in model.predict_many(foreign))


def test_rows_and_summary_count_out_of_distribution_images(ood_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "alike.png"), gradient_image(64, 64, 200))
    cv2.imwrite(str(folder / "white.png"), np.full((64, 64), 255, np.uint8))
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["infer", str(folder), "-m", str(ood_bundle), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["white.png"]["ood"] == "true" and float(rows["white.png"]["ood_score"]) > 1.0
    assert rows["alike.png"]["ood"] == "false"
    assert "unlike training images" in result.output


def test_bundle_without_statistics_leaves_the_columns_empty(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    model = pneumoedge.load(bundle_dir)
    assert not model.can_flag_ood and "cannot flag" in model.ood_note
    assert all(r.ood is None and r.ood_score is None for r in model.predict_many(sorted(image_folder.rglob("*.png"))))
    out = tmp_path / "r.jsonl"
    assert runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out)]).exit_code == 0
    assert all(json.loads(line)["ood"] is None for line in out.read_text().splitlines())
    result = runner.invoke(app, ["info", str(bundle_dir)])
    assert "cannot flag out-of-distribution" in " ".join(result.output.split())


def test_tampered_statistics_are_refused(ood_bundle: Path, tmp_path: Path) -> None:
    stats = OodStats.load(ood_bundle / "m.fp32.ood.npz")
    OodStats(stats.mean, stats.precision, stats.threshold * 100).save(ood_bundle / "m.fp32.ood.npz")  # a laxer threshold
    with pytest.raises(BundleError, match="checksum mismatch"):
        pneumoedge.load(ood_bundle)
    result = runner.invoke(app, ["infer", str(tmp_path), "-m", str(ood_bundle)])
    assert result.exit_code == 2 and "checksum mismatch" in result.output
    (ood_bundle / "m.fp32.ood.npz").unlink()
    with pytest.raises(BundleError, match="missing"):
        pneumoedge.load(ood_bundle)


def test_big_statistics_are_hashed_once_and_a_changed_file_is_still_refused(ood_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """Like a big member: the check of this very file is remembered; any change to it is not."""
    from pneumoedge.runtime import ood

    monkeypatch.setenv("PNEUMOEDGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ood, "OPTIMIZED_GRAPH_MIN_BYTES", 0)  # this small file counts as big
    hashed = []
    monkeypatch.setattr(ood, "check_digest", lambda *args: hashed.append(args[0]))
    pneumoedge.load(ood_bundle)
    pneumoedge.load(ood_bundle)
    assert len(hashed) == 1
    monkeypatch.undo()
    monkeypatch.setenv("PNEUMOEDGE_CACHE_DIR", str(tmp_path / "cache"))
    stats = OodStats.load(ood_bundle / "m.fp32.ood.npz")
    OodStats(stats.mean, stats.precision, stats.threshold * 100).save(ood_bundle / "m.fp32.ood.npz")
    with pytest.raises(BundleError, match="checksum mismatch"):
        pneumoedge.load(ood_bundle)


def test_composed_bundles_keep_their_members_statistics(ood_bundle: Path, tmp_path: Path, reference_images: list[Path]) -> None:
    out = tmp_path / "composed"
    result = runner.invoke(app, ["bundle", "create", str(out), str(ood_bundle), str(ood_bundle.parent / "m.onnx"), "--weights", "3,1", "--threshold", "fixed:0.5"])
    assert result.exit_code == 0, result.output
    composed, original = pneumoedge.load(out, precision="fp32"), pneumoedge.load(ood_bundle, precision="fp32")
    assert composed.can_flag_ood
    # Only the bundle's member has statistics: the composed score is that member's ratio.
    # (equal up to the rounding of weighting one ratio by 0.75 and dividing by 0.75 again)
    assert [r.ood_score for r in composed.predict_many(reference_images[:4])] == pytest.approx([r.ood_score for r in original.predict_many(reference_images[:4])], rel=1e-12)


def test_bench_measures_what_the_score_adds(ood_bundle: Path, reference_images: list[Path], bundle_dir: Path) -> None:
    from pneumoedge.benchmarking.bench import BenchSettings, run_bench

    settings = BenchSettings(runs=5, warmup=1, batch=2, throughput_images=4)
    figures = run_bench(ood_bundle, reference_images[:3], settings)["ensemble"]["ood"]
    assert figures["with_ood_ms"]["count"] == figures["without_ood_ms"]["count"] == 5
    assert figures["cost_ms"] >= 0 and 0 <= figures["fraction_of_end_to_end"] < 1
    assert run_bench(bundle_dir, reference_images[:3], settings)["ensemble"]["ood"] is None


def test_a_wrapped_onnx_model_gets_statistics_from_its_reference_folder(tmp_path: Path, reference_images: list[Path]) -> None:
    from tests.foreign_models import cnn

    source = cnn(tmp_path / "their.onnx", size=(48, 48), channels=1, classes=2, head="logits")
    out = tmp_path / "wrapped"
    result = runner.invoke(app, ["export", str(source), "--out", str(out), "--size", "48", "48", "--color", "gray", "--layout", "NCHW",
                                 "--head", "logits", "--reference", str(reference_images[0].parent)])
    assert result.exit_code == 0, result.output
    model = pneumoedge.load(out)
    assert model.can_flag_ood and "48 images" in model.ood_note
    assert all(r.ood_score is not None for r in model.predict_many(reference_images[:3]))


def test_float32_distances_equal_the_float64_formula() -> None:
    """The run-time GEMM form gives the float64 einsum's distances, also for a wide feature layer."""
    rng = np.random.default_rng(3)
    width = 512
    mixing = rng.normal(size=(width, width)) / np.sqrt(width)
    reference = rng.normal(size=(300, width)) @ mixing + 5.0  # correlated, offset features
    stats, _ = fit(reference)
    probe = np.concatenate([rng.normal(size=(20, width)) @ mixing + 5.0, rng.normal(size=(5, width)) * 3.0])
    fast, exact = stats.distances(probe), stats.exact_distances(probe)
    assert fast.dtype == np.float64 and fast.shape == (25,)
    np.testing.assert_allclose(fast, exact, rtol=1e-4)
    assert ((fast >= stats.threshold) == (exact >= stats.threshold)).all()
    # An image's score does not depend on the batch it came in, bit for bit.
    singles = np.concatenate([stats.distances(probe[i : i + 1]) for i in range(len(probe))])
    np.testing.assert_array_equal(singles, fast)
    np.testing.assert_array_equal(stats.distances(probe[3:11]), fast[3:11])
