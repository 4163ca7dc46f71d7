"""int8: static QDQ quantization checked against fp32 (numbers and structure), refusal, recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.export_helpers import export_base, phantom_root, tiny_onnx, tiny_run  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def _calibration(base: Path) -> np.ndarray:
    from pneumoedge.export.tensors import image_files, load_tensors

    return load_tensors(image_files(phantom_root(base) / "train", limit=32), tiny_run(base).spec)


def test_int8_agreement_structure_and_report(export_base: Path) -> None:
    pytest.importorskip("tensorflow")
    import onnx

    from pneumoedge.bundle import ONNX_METADATA_KEY
    from pneumoedge.export.tensors import image_files, load_tensors
    from pneumoedge.export.quantization import Tolerance, qdq_node_count, quantize_int8

    fp32 = tiny_onnx(export_base)
    run = tiny_run(export_base)
    test_files = image_files(phantom_root(export_base) / "test")
    x_test = load_tensors(test_files, run.spec)
    y_test = np.array([0 if "NORMAL" in str(f.parent.name) else 1 for f in test_files])
    result = quantize_int8(
        fp32.onnx_path, export_base / "tiny.int8.onnx", _calibration(export_base), eval_tensors=x_test, y_true=y_test,
        threshold=run.threshold, tolerance=Tolerance(max_prob_diff=0.05, min_agreement=0.9), on_fail="warn",
    )
    chosen = result.chosen
    assert chosen is not None and result.int8_path.is_file()
    assert qdq_node_count(result.int8_path) == chosen.qdq_nodes > 0
    assert chosen.size_bytes < result.fp32_size_bytes
    assert 0.0 <= chosen.agreement <= 1.0 and chosen.max_prob_diff < 0.2
    assert chosen.accuracy is not None and result.fp32_accuracy is not None
    props = {p.key: p.value for p in onnx.load(str(result.int8_path)).metadata_props}
    assert ONNX_METADATA_KEY in props and "pneumoedge_quantization" in props
    report = result.to_dict()
    assert report["tried"] and report["fp32"]["size_bytes"] == result.fp32_size_bytes
    if result.ok:
        assert chosen.meets and chosen.agreement >= 0.9


def test_int8_refuses_or_warns_beyond_tolerance(export_base: Path) -> None:
    pytest.importorskip("tensorflow")
    from pneumoedge.export.errors import QuantizationError
    from pneumoedge.export.quantization import Tolerance, quantize_int8

    fp32 = tiny_onnx(export_base).onnx_path
    impossible = Tolerance(max_prob_diff=0.0, min_agreement=1.0)
    calib = _calibration(export_base)
    with pytest.raises(QuantizationError, match="no int8 recipe meets the tolerance"):
        quantize_int8(fp32, export_base / "refused.onnx", calib, tolerance=impossible, search=False)
    assert not (export_base / "refused.onnx").exists()
    warned = quantize_int8(fp32, export_base / "warned.onnx", calib, tolerance=impossible, search=False, on_fail="warn")
    assert not warned.ok and any("no int8 recipe" in w for w in warned.warnings)


def test_recipe_registry_and_unknown_recipe(export_base: Path) -> None:
    from pneumoedge.export.errors import QuantizationError
    from pneumoedge.export.quantization import DEFAULT_RECIPE, RECIPES, quantize_int8

    assert DEFAULT_RECIPE in RECIPES
    pairs = {(r.activation_type, r.weight_type) for r in RECIPES.values()}
    assert {("uint8", "int8"), ("uint8", "uint8"), ("int8", "int8")} <= pairs
    assert any(r.reduce_range for r in RECIPES.values())
    assert {r.calibrate_method for r in RECIPES.values()} == {"minmax", "entropy", "percentile"}
    with pytest.raises(QuantizationError, match="unknown recipe"):
        quantize_int8(Path("x.onnx"), Path("y.onnx"), np.zeros((1, 8, 8, 1), np.float32), recipe="fp4")


def test_qoperator_recipe_and_fair_timing(export_base: Path, tmp_path: Path) -> None:
    """A QOperator recipe writes QLinearConv; `time_models` times fp32 and int8 side by side."""
    pytest.importorskip("tensorflow")
    import onnx

    from pneumoedge.bundle import card_from_metadata
    from pneumoedge.export.onnx_run import onnx_session
    from pneumoedge.export.quantization import RECIPES, preprocess_for_quantization, quantize_with, time_models

    fp32 = tiny_onnx(export_base).onnx_path
    calib = _calibration(export_base)
    card = card_from_metadata(onnx_session(fp32).get_modelmeta().custom_metadata_map, str(fp32))
    pre = preprocess_for_quantization(fp32, tmp_path / "pre.onnx")
    qop = [r for r in RECIPES.values() if r.quant_format == "qoperator"]
    assert qop, "the registry offers a QOperator recipe"
    out = quantize_with(qop[0], pre, tmp_path / "qop.onnx", calib, card)
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(out)).graph.node}
    times = time_models([fp32, out], calib, rounds=2, per_round=2)
    assert len(times) == 2 and all(t > 0 and np.isfinite(t) for t in times)


def test_search_grows_the_fp32_set_in_sensitivity_order_then_bisects(export_base: Path) -> None:
    pytest.importorskip("tensorflow")
    from pneumoedge.export.quantization import Tolerance, quantize_int8

    fp32 = tiny_onnx(export_base).onnx_path
    strict = Tolerance(max_prob_diff=2e-5, min_agreement=1.0)  # no plain recipe holds this on the tiny model
    result = quantize_int8(fp32, export_base / "grown.onnx", _calibration(export_base), tolerance=strict, budget_s=300, on_fail="warn")
    counts = [point["fp32_nodes"] for point in result.curve]
    assert counts == sorted(set(counts)) and counts[0] == 1, counts
    passing = [point["fp32_nodes"] for point in result.curve if point["meets"]]
    if passing:  # the fewest nodes that meet it: every smaller count tried failed
        assert all(not point["meets"] for point in result.curve if point["fp32_nodes"] < min(passing))
        assert result.ok and result.chosen.meets
    assert all(point["latency_ms"] > 0 for point in result.curve)
    assert result.to_dict()["curve"] == result.curve
