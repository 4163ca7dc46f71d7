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
    from pneumoedge.export.int8_search import quantize_int8
    from pneumoedge.export.quantization import qdq_node_count
    from pneumoedge.int8_tolerance import Tolerance

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
    from pneumoedge.export.int8_search import quantize_int8
    from pneumoedge.int8_tolerance import Tolerance

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
    from pneumoedge.export.int8_search import quantize_int8
    from pneumoedge.export.quantization import DEFAULT_RECIPE, RECIPES

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
    from pneumoedge.export.int8_search import time_models
    from pneumoedge.export.quantization import RECIPES, preprocess_for_quantization, quantize_with

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


def _strict_search(base: Path, out: str, **options):
    from pneumoedge.export.int8_search import quantize_int8
    from pneumoedge.export.quantization import SearchBudget
    from pneumoedge.int8_tolerance import Tolerance

    strict = Tolerance(max_prob_diff=2e-5, min_agreement=1.0)  # no plain recipe holds this on the tiny model
    budget = options.pop("budget", SearchBudget(trials=20, rank_trials=6, rank_images=8, max_fp32_nodes=6))
    return quantize_int8(tiny_onnx(base).onnx_path, base / out, _calibration(base)[:16], tolerance=strict, budget=budget, on_fail="warn", **options)


def _decisions(result) -> dict:
    """What the search decided, without the timing figures."""
    return {
        "chosen": (result.chosen.recipe.to_dict(), result.chosen.fp32_nodes),
        "tried": [(c.recipe.name, c.recipe.exclude, c.max_prob_diff, c.agreement, c.meets) for c in result.tried],
        "curve": [(p["fp32_nodes"], p["nodes"], p["max_prob_diff"], p["meets"]) for p in result.curve],
        "ranking": result.ranking,
        "trials": result.trials,
    }


def test_search_ranks_nodes_by_effect_and_grows_the_fp32_set(export_base: Path) -> None:
    pytest.importorskip("tensorflow")
    result = _strict_search(export_base, "grown.onnx")
    assert len(result.tried) <= result.trials <= min(20, len(result.tried) + 6)
    ranked = [r["node"] for r in result.ranking]
    assert ranked and len(ranked) == len(set(ranked)), "every quantizable node ranked once"
    effects = [r["effect"] for r in result.ranking]
    assert effects == sorted(effects, reverse=True) and max(effects) > 0
    counts = [p["fp32_nodes"] for p in result.curve]
    assert counts == list(range(len(counts))) and len(counts) >= 2, counts  # the base, then one more node per step
    for before, after in zip(result.curve, result.curve[1:]):  # each step keeps the last set and adds a well-ranked node
        assert after["nodes"][:-1] == before["nodes"]
        assert ranked.index(after["nodes"][-1]) < len(before["nodes"]) + 4
    step = [c for c in result.tried if c.fp32_nodes == 1]  # the first step tried the pool, kept the best of it
    assert [c.recipe.exclude[0] for c in step] == ranked[: len(step)]
    assert result.curve[1]["max_prob_diff"] == min(c.max_prob_diff for c in step if c.agreement == max(d.agreement for d in step))
    passing = [p["fp32_nodes"] for p in result.curve if p["meets"]]
    if passing:  # growth stops at the first set that meets it
        assert passing == [counts[-1]] and result.ok and result.chosen.meets
    assert all(p["latency_ms"] > 0 for p in result.curve)
    assert result.to_dict()["curve"] == result.curve and result.to_dict()["budget"]["trials"] == 20


def test_search_is_the_same_on_a_slow_machine_and_a_cap_stops_it_loudly(export_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is work, not seconds: a clock that races (a loaded machine) changes nothing, bytes included."""
    pytest.importorskip("tensorflow")
    import itertools

    from pneumoedge.export import int8_search

    quiet = _strict_search(export_base, "quiet.onnx")
    ticks = itertools.count()
    monkeypatch.setattr(int8_search, "_clock", lambda: 1000.0 * next(ticks))  # every look at the clock: 1000 s later
    busy = _strict_search(export_base, "busy.onnx")
    assert _decisions(busy) == _decisions(quiet)
    assert (export_base / "busy.onnx").read_bytes() == (export_base / "quiet.onnx").read_bytes()
    assert not any("stopped early" in w for w in busy.warnings)

    capped = _strict_search(export_base, "capped.onnx", budget_s=1500.0)  # the optional cap: allowed, never silent
    assert capped.trials < quiet.trials
    assert any("wall-clock cap of 1500 s" in w and "depends on the machine" in w for w in capped.warnings)
    assert capped.to_dict()["budget"]["time_limit_s"] == 1500.0


def test_int8_that_is_not_fast_enough_is_refused_when_speed_is_asked(export_base: Path) -> None:
    pytest.importorskip("tensorflow")
    from pneumoedge.export.errors import QuantizationError
    from pneumoedge.export.int8_search import quantize_int8
    from pneumoedge.int8_tolerance import Tolerance

    fp32, calib = tiny_onnx(export_base).onnx_path, _calibration(export_base)[:8]
    loose = Tolerance(max_prob_diff=1.0, min_agreement=0.0)
    with pytest.raises(QuantizationError, match="fp32's latency"):  # no int8 model runs in no time
        quantize_int8(fp32, export_base / "slow.onnx", calib, tolerance=loose, search=False, max_latency_ratio=0.0)
    warned = quantize_int8(fp32, export_base / "slow.onnx", calib, tolerance=loose, search=False, max_latency_ratio=0.0, on_fail="warn")
    assert not warned.ok and any("above the 0x asked" in w for w in warned.warnings)
    assert quantize_int8(fp32, export_base / "fine.onnx", calib, tolerance=loose, search=False, max_latency_ratio=1e9).ok
