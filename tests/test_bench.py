"""`pneumoedge bench` and benchmarks/compare.py: figures consistent, JSON schema, clear errors. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoedge.cli import app
from pneumoedge.benchmarking.bench import SCHEMA, BenchSettings, run_bench
from pneumoedge.benchmarking.images import write_phantoms
from pneumoedge.benchmarking.measure import STAT_KEYS, BenchError, summarize

ROOT = Path(__file__).resolve().parent.parent
ORDERED = ("min", "p50", "p90", "p95", "p99", "max")


def _check_stats(stats: dict, runs: int) -> None:
    assert tuple(stats) == STAT_KEYS
    assert stats["count"] == runs
    values = [stats[k] for k in ORDERED]
    assert values == sorted(values), stats
    assert stats["min"] <= stats["mean"] <= stats["max"]
    assert stats["std"] >= 0


@pytest.mark.parametrize("samples", [[0.003], [0.002] * 7, list(np.random.default_rng(0).exponential(0.01, 101))])
def test_summarize_orders_and_counts(samples: list[float]) -> None:
    stats = summarize(samples)
    _check_stats(stats, len(samples))
    assert stats["min"] == pytest.approx(min(samples) * 1000)


def test_summarize_refuses_nothing() -> None:
    with pytest.raises(BenchError):
        summarize([])


def test_run_bench_figures_are_consistent(bundle_dir: Path, image_folder: Path) -> None:
    images = sorted(p for p in image_folder.rglob("*") if p.is_file())
    report = run_bench(bundle_dir, images, BenchSettings(runs=7, warmup=1, batch=3, throughput_images=10), command=["test"])
    assert report["schema"] == SCHEMA
    assert set(report) >= {"created", "command", "machine", "versions", "settings", "members", "ensemble", "memory"}
    assert {"cpu", "physical_cores", "logical_cores", "os"} <= set(report["machine"])
    assert {"pneumoedge", "onnxruntime", "numpy", "opencv"} <= set(report["versions"])
    assert [m["name"] for m in report["members"]] == ["gray", "rgb"]
    for member in report["members"]:
        for key in ("model_only_ms", "model_only_batch_ms", "preprocess_ms"):
            _check_stats(member[key], 7)
        assert member["session_create_ms"] > 0 and member["first_inference_ms"] > 0
        assert member["provider"] == "CPUExecutionProvider"
    ensemble = report["ensemble"]
    for key in ("decode_ms", "tensors_ms", "model_only_ms", "end_to_end_ms"):
        _check_stats(ensemble[key], 7)
    assert sum(ensemble["split"].values()) == pytest.approx(1.0)
    assert ensemble["throughput"]["images"] == ensemble["throughput"]["ok"] == 10
    stages = ensemble["stages_ms"]
    assert list(stages) == ["decode", "preprocess", "model", "ood", "heatmap", "overlay", "row"]
    assert stages["decode"] == ensemble["decode_ms"]["p50"] and stages["model"] == ensemble["model_only_ms"]["p50"]
    assert stages["row"] > 0 and stages["ood"] is None and stages["heatmap"] is None  # this model has neither
    assert report["memory"]["peak_rss_mb"] > 0
    json.dumps(report)  # serialisable as is


def test_write_phantoms_gives_jpeg_and_16_bit_png(tmp_path: Path) -> None:
    paths = write_phantoms(tmp_path, n=3, size=(64, 48))
    assert [p.suffix for p in paths] == [".jpeg", ".jpeg", ".png"]


def test_cli_bench_json(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(bundle_dir), "--images", str(image_folder), "--runs", "4", "--warmup", "0", "--batch", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert report["settings"]["runs"] == 4 and report["settings"]["batch"] == 2
    _check_stats(report["ensemble"]["end_to_end_ms"], 4)
    assert "end to end" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "0"], "--runs must be at least 1"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--device", "tpu"], "device must be one of"),
        (["--precision", "int8"], "has no int8 members"),
        (["--images", "MISSING"], "no such folder"),
        (["--images", "EMPTY"], "no image files"),
    ],
)
def test_cli_bench_bad_arguments(bundle_dir: Path, image_folder: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "missing") if a == "MISSING" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    if "--images" not in args:
        args += ["--images", str(image_folder)]
    result = CliRunner().invoke(app, ["bench", str(bundle_dir), "--runs", "2", *args] if "--runs" not in args else ["bench", str(bundle_dir), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_bench_never_imports_tensorflow(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code = f"""
        import sys
        for name in ("tensorflow", "keras", "tf2onnx", "tf_keras"):
            sys.modules[name] = None  # any import of these now fails loudly
        from pneumoedge.cli import app
        try:
            app(["bench", {str(bundle_dir)!r}, "--images", {str(image_folder)!r}, "--runs", "2", "--json", {str(out)!r}], standalone_mode=False)
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx") and sys.modules[m] is not None)
        assert not loaded, loaded
        print("clean")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout and out.is_file()


def test_compare_quick_writes_results(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("PIL")
    out = tmp_path / "results"
    committed = ROOT / "benchmarks" / "RESULTS.md"
    before = committed.read_bytes() if committed.is_file() else None
    # No Keras runs there: the untrained stand-ins are used (and RESULTS says so).
    command = [sys.executable, "benchmarks/compare.py", "--quick", "--out", str(out), "--keras-runs", str(tmp_path / "no-runs"), "--note", "test"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    for section in ("## Models", "## Targets", "## End to end", "## Model only", "## Cold start", "## Installed size",
                    "## Compute-bound reference", "## Memory over a long run", "## Speed work", "QUICK"):
        assert section in text, section
    assert "untrained stand-in" in text and "failed" not in text
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "pneumoedge.compare/1" and data["note"] == "test"
    assert {"founding", "keras", "tflite_fp32", "tflite_int8"} <= set(data["runtimes"])
    assert (committed.read_bytes() if committed.is_file() else None) == before  # tests never touch the committed results


def test_onnx_macs_counts_conv_and_matmul_from_shapes(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.static import onnx_macs

    weights = [numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w"), numpy_helper.from_array(np.ones((256, 2), np.float32), "m")]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # (N, 4, 8, 8): 4*8*8 outputs x 9 MACs
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("MatMul", ["f", "m"], ["y"]),  # (N, 256) x (256, 2): 2 outputs x 256 MACs
        ],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=weights,
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    macs = onnx_macs(path)
    assert macs["per_op_macs"] == {"Conv": 4 * 8 * 8 * 9, "MatMul": 2 * 256}
    assert macs["flops"] == 2 * macs["macs"] and macs["nodes_without_shapes"] == 0


def test_explain_mode_figures_beside_the_plain_ones(image_folder: Path, tmp_path: Path) -> None:
    from tests.conftest import SPEC_GRAY
    from tests.explain_models import map_model

    images = sorted(p for p in image_folder.rglob("*") if p.is_file())
    settings = BenchSettings(runs=5, warmup=1, batch=2, throughput_images=8)
    report = run_bench(map_model(tmp_path / "m.onnx", SPEC_GRAY), images, settings, command=["test"])
    explain = report["ensemble"]["explain"]
    _check_stats(explain["end_to_end_ms"], 5)
    assert explain["throughput"]["images"] == explain["throughput"]["ok"] == 8
    expected = explain["end_to_end_ms"]["p50"] / report["ensemble"]["end_to_end_ms"]["p50"]
    assert explain["end_to_end_ratio"] == pytest.approx(expected, rel=1e-6)
    assert explain["overlay_side"] == 768
    stages = report["ensemble"]["stages_ms"]
    assert stages["overlay"] == explain["overlay_ms"]["p50"] and stages["heatmap"] >= 0
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "m.onnx"), "--images", str(image_folder), "--runs", "2", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert "per image, by stage" in result.output and "heatmap (explain only)" in result.output
    plain = run_bench(map_model(tmp_path / "p.onnx", SPEC_GRAY, heatmaps=False), images, settings)
    assert plain["ensemble"]["explain"] is None
