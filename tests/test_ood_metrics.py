"""Tests for scripts/measure_ood.py: its metrics on fixed arrays, and whole runs on tiny bundles."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pneumoedge.bundle import ONNX_METADATA_KEY, MemberSource, ModelCard, write_bundle
from pneumoedge.datasets.foreign import FOREIGN_KINDS
from pneumoedge.datasets.phantoms import render_phantom
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from pneumoedge.runtime.ood import fit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "measure_ood.py"
_spec = importlib.util.spec_from_file_location("measure_ood", SCRIPT)
measure_ood = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(measure_ood)

SPEC = PreprocessSpec(height=32, width=32, color="gray", resize="area")


def _pairwise_auroc(neg, pos) -> float:
    """The definition: P(pos > neg) + P(pos == neg) / 2 over all pairs."""
    neg, pos = np.asarray(neg, float)[:, None], np.asarray(pos, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size))


# --- metrics ---------------------------------------------------------------------------------

def test_average_ranks_share_ties():
    assert measure_ood.average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert measure_ood.average_ranks(np.array([5.0])).tolist() == [1.0]


@pytest.mark.parametrize(
    "neg, pos, expected",
    [
        ([0.1, 0.2, 0.3], [0.9, 1.5], 1.0),
        ([0.9, 1.5], [0.1, 0.2, 0.3], 0.0),
        ([1.0, 1.0], [1.0, 1.0, 1.0], 0.5),
        ([0.0, 1.0], [1.0, 2.0], 0.875),  # pairs: (0,1) win, (0,2) win, (1,1) half, (1,2) win
    ],
)
def test_auroc_on_fixed_arrays(neg, pos, expected):
    assert measure_ood.auroc(neg, pos) == pytest.approx(expected)


def test_auroc_equals_the_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        neg = rng.integers(0, 6, int(rng.integers(1, 40))).astype(float)
        pos = rng.integers(2, 9, int(rng.integers(1, 40))).astype(float)
        assert measure_ood.auroc(neg, pos) == pytest.approx(_pairwise_auroc(neg, pos), abs=1e-12)


def test_auroc_refuses_nan_and_says_none_when_a_side_is_empty():
    assert measure_ood.auroc([], [1.0]) is None and measure_ood.auroc([1.0], []) is None
    with pytest.raises(ValueError, match="finite"):
        measure_ood.auroc([0.1, float("nan")], [1.0])


@pytest.mark.parametrize(
    "k, n, low, high",
    [(4, 200, 0.007804, 0.050287), (0, 50, 0.0, 0.07135), (50, 50, 0.92865, 1.0), (1, 4, 0.04559, 0.69936)],
)
def test_wilson_interval(k, n, low, high):
    lo, hi = measure_ood.wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=2e-5) and hi == pytest.approx(high, abs=2e-5)
    assert measure_ood.wilson_interval(0, 0) is None


def test_summarise_rates_counts_and_pooled_auroc():
    groups = {
        "heldout": ([False, False, False, True], [0.5, 0.7, 0.9, 1.2]),
        "noise": ([True, True], [5.0, 3.0]),
        "skull": ([False, True, False], [0.6, 1.1, 0.8]),
    }
    rows = measure_ood.summarise(groups)
    assert rows["heldout"]["false_alarm_rate"] == 0.25 and rows["heldout"]["flagged"] == 1
    assert rows["noise"]["detection_rate"] == 1.0 and rows["noise"]["auroc"] == 1.0
    assert rows["skull"]["detection_rate"] == pytest.approx(1 / 3)
    assert rows["skull"]["auroc"] == pytest.approx(_pairwise_auroc([0.5, 0.7, 0.9, 1.2], [0.6, 1.1, 0.8]))
    pooled = rows["all_foreign"]
    assert pooled["images"] == 5 and pooled["flagged"] == 3 and pooled["detection_rate"] == 0.6
    assert pooled["auroc"] == pytest.approx(_pairwise_auroc([0.5, 0.7, 0.9, 1.2], [5.0, 3.0, 0.6, 1.1, 0.8]))
    assert pooled["median"] == 1.1 and rows["noise"]["mean"] == 4.0
    table = measure_ood.format_table(rows)
    assert "| held-out phantoms (false alarms) | 4 | 1 | 25.0% (4.6%-69.9%) | - |" in table
    assert "| all foreign | 5 | 3 | 60.0% (23.1%-88.2%) |" in table
    with pytest.raises(ValueError, match="heldout"):
        measure_ood.summarise({"noise": ([True], [2.0])})


# --- whole runs on tiny bundles ------------------------------------------------------------

def _features_model(path: Path) -> Path:
    """Mean-brightness classifier with a pooled-features output: (mean, mean of squares, spread) per image."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m2"]),
        helper.make_node("Mul", ["input", "input"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["msq"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["msq", "col"], ["msq2"]),
        helper.make_node("ReduceMax", ["input"], ["mx"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mx", "col"], ["mx2"]),
        helper.make_node("Concat", ["m2", "msq2", "mx2"], ["features"], axis=1),
        helper.make_node("Mul", ["m2", "a"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "features_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32, 32, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
        initializer=[helper.make_tensor("a", TensorProto.FLOAT, [1], [4.0]), helper.make_tensor("b", TensorProto.FLOAT, [1], [-2.0]),
                     helper.make_tensor("axis1", TensorProto.INT64, [1], [1]), helper.make_tensor("col", TensorProto.INT64, [2], [-1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    card = ModelCard(spec=SPEC, labels=("NORMAL", "PNEUMONIA"), explain={"features_output": "features"})
    helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(card.to_dict())})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory) -> Path:
    """A one-member bundle whose statistics are fitted on 60 phantoms' features (seed 100)."""
    base = tmp_path_factory.mktemp("ood")
    model = _features_model(base / "features.onnx")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(100)
    tensors = np.stack([preprocess(render_phantom(rng, ("normal", "bacteria", "virus")[i % 3], 96, 96), SPEC) for i in range(60)])
    features = session.run(["features"], {"input": tensors})[0]
    stats, meta = fit(features)
    write_bundle(base / "bundle", [MemberSource(model, "tiny", SPEC, explain={"features_output": "features"},
                                                ood_file=stats.save(base / "stats.npz"), ood=meta)],
                 labels=("NORMAL", "PNEUMONIA"), provenance={"synthetic": True,
                                                           "data_generator": "pneumoedge.datasets.phantoms.generate_dataset(seed=100, size=96)"})
    return base / "bundle"


def test_whole_run_writes_figures(ood_bundle, tmp_path):
    out = tmp_path / "figures.json"
    code = measure_ood.main(["--model", str(ood_bundle), "--per-kind", "3", "--heldout", "12", "--size", "96", "96", "--sweep", "2",
                             "--out", str(out), "--seed", "3", "--work", str(tmp_path / "work")])
    assert code == 0
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert figures["heldout"]["images"] == 12 and figures["all_foreign"]["images"] == 3 * len(FOREIGN_KINDS)
    assert set(figures) == {"heldout", "all_foreign", *FOREIGN_KINDS}
    assert sum(v["images"] for v in result["heldout_phantoms"]["by_class"].values()) == 12
    assert result["statistics"][0]["member"] == "tiny" and result["statistics"][0]["reference_images"] == 48
    assert result["heldout_phantoms"]["training_seed"] == 100
    for kind in FOREIGN_KINDS:
        row = figures[kind]
        assert 0 <= row["flagged"] <= 3 and row["detection_rate"] == row["flagged"] / 3
        assert 0.0 <= row["auroc"] <= 1.0
    # Flat grey and noise have nothing like a phantom's brightness spread: far out in these 3 features.
    assert figures["uniform"]["detection_rate"] == 1.0 and figures["noise"]["detection_rate"] == 1.0
    assert "synthetic" in result["notice"].lower() and result["machine"]["logical_cores"] >= 1
    assert len(list((tmp_path / "work" / "foreign").rglob("*.jpeg"))) == 3 * len(FOREIGN_KINDS)
    sweep = result["sweep"]["figures"]
    assert len(sweep) == sum(len(v) for v in measure_ood.SWEEP.values()) and "all_foreign" not in sweep
    assert all(row["images"] == 2 for row in sweep.values())
    assert sweep["gain x3"]["detection_rate"] == 1.0  # a tripled brightness moves all three features far out


def test_degrade_steps():
    img = render_phantom(np.random.default_rng(0), "normal", 120, 160)
    lap = lambda x: cv2.Laplacian(x.astype(np.float32), cv2.CV_32F).var()  # noqa: E731
    assert lap(measure_ood.degrade(img, "blur", 2.0)) < 0.2 * lap(img)
    assert np.array_equal(measure_ood.degrade(img, "gain", 2.0), np.clip(img.astype(int) * 2, 0, 255).astype(np.uint8))
    noisy = measure_ood.degrade(img, "noise", 20.0, seed=1)
    assert np.array_equal(noisy, measure_ood.degrade(img, "noise", 20.0, seed=1)) and 10 < np.abs(noisy.astype(int) - img).mean() < 25
    assert measure_ood.degrade(img, "gamma", 2.5).mean() < img.mean() < measure_ood.degrade(img, "gamma", 0.5).mean()
    with pytest.raises(ValueError, match="unknown family"):
        measure_ood.degrade(img, "rotate", 10)


def test_refuses_without_statistics_and_on_mistakes(bundle_dir, ood_bundle, tmp_path, capsys):
    cases = [
        (["--model", str(bundle_dir)], "carries no out-of-distribution statistics"),
        (["--model", str(tmp_path / "missing")], "no such file or folder"),
        (["--model", str(ood_bundle), "--seed", "100"], "seed of the bundle's training phantoms"),
        (["--per-kind", "0"], "at least 1"),
        (["--size", "16", "40"], "at least 32x32"),
    ]
    for argv, message in cases:
        out = tmp_path / "never.json"
        assert measure_ood.main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_script_runs_as_a_program(bundle_dir):
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(bundle_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("measure_ood: ") and "no out-of-distribution statistics" in done.stderr
    helped = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--per-kind" in helped.stdout and "no score is ever invented" in helped.stdout
