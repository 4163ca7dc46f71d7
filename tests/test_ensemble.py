"""Ensemble maths against hand computations, and the Python API's behaviour."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import pneumoedge
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from tests.conftest import SPEC_GRAY, SPEC_RGB
from tests.onnx_models import expected_probability, mean_model


def test_weighted_average_matches_hand_computation(bundle_dir: Path, image_folder: Path) -> None:
    model = pneumoedge.load(bundle_dir)
    for path in sorted(image_folder.rglob("*.*")):
        p_gray = expected_probability(preprocess(path, SPEC_GRAY), 4.0, -2.0)
        p_rgb = expected_probability(preprocess(path, SPEC_RGB), -3.0, 1.0)
        expected = (1 * p_gray + 3 * p_rgb) / 4
        result = model.predict(path)
        assert result.probabilities["PNEUMONIA"] == pytest.approx(expected, abs=1e-6)
        assert result.probabilities["NORMAL"] == pytest.approx(1 - expected, abs=1e-6)
        assert result.member_probabilities["gray"]["PNEUMONIA"] == pytest.approx(p_gray, abs=1e-6)
        assert result.member_probabilities["rgb"]["PNEUMONIA"] == pytest.approx(p_rgb, abs=1e-6)
        assert result.disagreement == pytest.approx(abs(p_gray - p_rgb), abs=1e-6)
        assert result.label == ("PNEUMONIA" if expected >= 0.4 else "NORMAL")
        assert result.probability == pytest.approx(result.probabilities[result.label])
        assert result.provider == "CPUExecutionProvider"


def test_threshold_decides_binary_label(tmp_path: Path) -> None:
    spec = PreprocessSpec(height=8, width=8, scale=1 / 255)
    path = mean_model(tmp_path / "m.onnx", spec, a=(1.0,), b=(0.0,), extra_metadata={"threshold": 0.6})
    model = pneumoedge.load(path)
    assert model.threshold == 0.6
    gray_half = np.full((8, 8), 128, np.uint8)  # mean ~0.502 -> sigmoid ~0.623
    assert model.predict(gray_half).label == "PNEUMONIA"
    dark = np.zeros((8, 8), np.uint8)  # sigmoid(0) = 0.5 < 0.6
    result = model.predict(dark)
    assert result.label == "NORMAL" and result.probability == pytest.approx(0.5)


def test_multiclass_softmax_and_logit_heads(tmp_path: Path) -> None:
    spec = PreprocessSpec(height=8, width=8, scale=1 / 255)
    labels = ("NORMAL", "BACTERIAL", "VIRAL")
    a, b = (1.0, -2.0, 3.0), (0.5, 0.0, -1.0)
    softmax = mean_model(tmp_path / "s.onnx", spec, a=a, b=b, head="softmax", labels=labels, task="multiclass")
    logits = mean_model(tmp_path / "l.onnx", spec, a=a, b=b, head="none", labels=labels, task="multiclass", activation="softmax")
    image = np.full((8, 8), 200, np.uint8)
    z = np.array(a) * (200 / 255) + np.array(b)
    expected = np.exp(z) / np.exp(z).sum()
    for path in (softmax, logits):
        result = pneumoedge.load(path).predict(image)
        np.testing.assert_allclose([result.probabilities[label] for label in labels], expected, atol=1e-6)
        assert result.label == labels[int(np.argmax(expected))]
        assert result.threshold is None
    ensemble = pneumoedge.load([softmax, logits])
    assert ensemble.predict(image).disagreement == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_logit_head_declared(tmp_path: Path) -> None:
    spec = PreprocessSpec(height=8, width=8, scale=1.0)
    path = mean_model(tmp_path / "logit.onnx", spec, a=(0.01,), b=(-1.0,), head="none", activation="sigmoid")
    image = np.full((8, 8), 150, np.uint8)
    assert pneumoedge.load(path).predict(image).probabilities["PNEUMONIA"] == pytest.approx(1 / (1 + np.exp(-0.5)), abs=1e-6)


def test_predict_many_keeps_order_and_reports_bad_inputs(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    model = pneumoedge.load(bundle_dir)
    good = sorted(str(p) for p in image_folder.rglob("*.*"))
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    sources = good[:2] + [str(corrupt), str(tmp_path / "missing.png")] + good[2:]
    results = list(model.predict_many(sources, batch_size=3, workers=2))
    assert [r.source for r in results] == sources
    assert [r.status for r in results] == ["ok", "ok", "error", "error"] + ["ok"] * (len(good) - 2)
    assert results[3].error  # a reason is given
    for source, result in zip(sources, results):
        if result.status == "ok":
            single = model.predict(source)
            assert result.probabilities == pytest.approx(single.probabilities, abs=1e-6)


def test_fixed_batch_model_runs_in_batches(tmp_path: Path, image_folder: Path) -> None:
    path = mean_model(tmp_path / "fixed.onnx", SPEC_GRAY, batch=1)
    model = pneumoedge.load(path)
    results = list(model.predict_many(sorted(image_folder.rglob("*.*")), batch_size=4))
    assert all(r.status == "ok" for r in results) and len(results) == 6


def test_api_is_safe_from_many_threads(bundle_dir: Path, image_folder: Path) -> None:
    model = pneumoedge.load(bundle_dir)
    paths = sorted(image_folder.rglob("*.*")) * 8
    expected = {p: model.predict(p).probabilities["PNEUMONIA"] for p in set(paths)}
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda p: (p, model.predict(p).probabilities["PNEUMONIA"]), paths))
    assert all(value == pytest.approx(expected[p], abs=1e-7) for p, value in got)


def test_predict_raises_image_error_for_unreadable_input(bundle_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(pneumoedge.ImageError):
        pneumoedge.load(bundle_dir).predict(bad)


def test_cuda_without_cuda_provider_fails_clearly(bundle_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(pneumoedge.DeviceError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        pneumoedge.load(bundle_dir, device="cuda")
    assert pneumoedge.load(bundle_dir, device="auto").provider == "CPUExecutionProvider"


@pytest.mark.parametrize("threads, runners", [(None, None), (1, 3)], ids=["one-runner", "three-runners"])
def test_predict_many_reads_ahead_a_bounded_amount(
    bundle_dir: Path, image_folder: Path, threads: Optional[int], runners: Optional[int]
) -> None:
    """Memory stays flat on huge folders: inputs are pulled lazily, at most (runners + 2) batches ahead."""
    model = pneumoedge.load(bundle_dir, threads=threads)
    paths = sorted(image_folder.rglob("*.*"))
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield paths[pulled % len(paths)]

    batch = 4
    stream = model.predict_many(endless(), batch_size=batch, workers=2, runners=runners)
    for done in range(1, 150):
        next(stream)
        assert pulled - done <= batch * ((runners or 1) + 2)
    stream.close()


def test_concurrent_runners_give_the_same_rows_in_order(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    """Batches run on several threads at once (threads=1 sessions) and still come back in input order."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = [str(p) for p in sorted(image_folder.rglob("*.*"))] * 5
    paths.insert(7, str(corrupt))
    serial = list(pneumoedge.load(bundle_dir).predict_many(paths, batch_size=3, runners=1))
    model = pneumoedge.load(bundle_dir, threads=1)
    parallel = list(model.predict_many(paths, batch_size=3, runners=3))
    assert [r.source for r in parallel] == paths
    assert [r.status for r in parallel] == [r.status for r in serial]
    assert parallel[7].status == "error"
    for a, b in zip(serial, parallel):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
