"""Keras -> ONNX export: parity on real preprocessed images, foreign models with declared specs, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoedge.preprocessing import PreprocessSpec, preprocess
from tests.export_helpers import (  # noqa: F401 (fixture)
    export_base,
    foreign_rgb_model,
    logits_model,
    mixed_layers_model,
    normalization_model,
    phantom_root,
    tiny_onnx,
    tiny_run,
)

pytestmark = pytest.mark.slow
LABELS = ("NORMAL", "PNEUMONIA")


@pytest.fixture(autouse=True)
def _needs_tensorflow() -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")


def test_parity_on_many_layer_kinds(export_base: Path, tmp_path: Path) -> None:
    import onnx

    from pneumoedge.bundle import ONNX_METADATA_KEY
    from pneumoedge.export.onnx_export import export_keras

    model = mixed_layers_model(64)
    before = [w.copy() for w in model.get_weights()]
    spec = PreprocessSpec(height=64, width=64, color="gray", resize="area")
    result = export_keras(model, tmp_path / "mixed.onnx", spec=spec, labels=LABELS, images=phantom_root(export_base) / "test")
    assert result.parity.ok and result.parity.max_abs_diff < 1e-5
    assert "images from" in result.parity.source and result.parity.images >= 8  # real images, not random tensors
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the Keras model is unchanged
    proto = onnx.load(str(result.onnx_path))
    assert proto.opset_import[0].version == 17
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch
    card = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_METADATA_KEY])
    assert card["spec"] == spec.to_dict() and card["labels"] == list(LABELS) and card["activation"] == "none"
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "MaxPool", "GlobalAveragePool", "Sigmoid"} <= ops


def test_parity_without_folder_uses_generated_phantoms(tmp_path: Path) -> None:
    from pneumoedge.export.onnx_export import export_keras

    spec = PreprocessSpec(height=64, width=64, color="gray")
    result = export_keras(mixed_layers_model(64), tmp_path / "m.onnx", spec=spec, labels=LABELS, parity_count=8)
    assert "phantom" in result.parity.source and result.parity.ok


def test_parity_refusal_with_absurd_tolerance(export_base: Path, tmp_path: Path) -> None:
    from pneumoedge.export.errors import ParityError
    from pneumoedge.export.onnx_export import export_keras

    spec = PreprocessSpec(height=64, width=64, color="gray")
    out = tmp_path / "refused.onnx"
    with pytest.raises(ParityError, match="differs from Keras"):
        export_keras(mixed_layers_model(64), out, spec=spec, labels=LABELS, images=phantom_root(export_base) / "test", tolerance=1e-30)
    assert not out.exists()


def test_foreign_rgb_softmax_model_runs_in_the_runtime_like_keras(export_base: Path, tmp_path: Path) -> None:
    import pneumoedge
    from pneumoedge.export.bundle_builder import BundleOptions
    from pneumoedge.export.foreign import export_foreign

    model = foreign_rgb_model(48)
    path = tmp_path / "their_model.keras"
    model.save(path)
    labels = ("NORMAL", "BACTERIAL", "VIRAL")
    # Rescaling is inside the model: the declared spec feeds raw 0..255 pixels, gray files expanded to RGB.
    spec = PreprocessSpec(height=48, width=48, color="rgb", resize="bilinear", scale=1.0, offset=0.0)
    result = export_foreign(path, tmp_path / "bundle", BundleOptions(images=phantom_root(export_base) / "test"), spec=spec, labels=labels, head="softmax")
    assert result.manifest.task == "multiclass" and result.manifest.labels == labels
    ensemble = pneumoedge.load(tmp_path / "bundle")
    files = sorted((phantom_root(export_base) / "test").rglob("*.*"))
    files = [f for f in files if f.suffix in (".jpeg", ".png")][:6]
    x = np.stack([preprocess(f, spec) for f in files])
    expected = model.predict(x, verbose=0)
    for f, row in zip(files, expected):
        got = ensemble.predict(f)
        assert got.status == "ok"
        assert np.allclose([got.probabilities[label] for label in labels], row, atol=1e-5)
        assert got.label == labels[int(np.argmax(row))]


def test_foreign_keras_normalization_statistics_become_constants_not_inputs(tmp_path: Path) -> None:
    """Keras 3 Normalization (as in every keras.applications EfficientNet) exports with one input and parity."""
    import onnx
    import onnxruntime as ort

    from pneumoedge.export.bundle_builder import BundleOptions
    from pneumoedge.export.foreign import export_foreign

    model = normalization_model(32)
    stats = [layer for layer in model.layers if layer.__class__.__name__ == "Normalization"]
    assert len(stats) == 2 and all(np.any(np.asarray(n.mean) != 0) and np.any(np.asarray(n.variance) != 1) for n in stats)
    path = tmp_path / "their_model.keras"
    model.save(path)
    spec = PreprocessSpec(height=32, width=32, color="rgb", resize="bilinear", scale=1.0, offset=0.0)
    result = export_foreign(path, tmp_path / "norm.onnx", BundleOptions(parity_tolerance=1e-5), spec=spec, labels=LABELS, head="softmax")
    assert result.parity.ok and result.parity.max_abs_diff <= 1e-5
    graph = onnx.load(str(result.onnx_path)).graph
    assert [i.name for i in graph.input] == ["input"]
    # Against the in-memory model too: the saved file kept the statistics, the ONNX graph holds them.
    x = np.random.default_rng(3).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([session.get_outputs()[0].name], {"input": x})[0]
    assert np.abs(got - model.predict(x, verbose=0)).max() < 1e-5


def test_captured_tensors_tf2onnx_leaves_as_inputs_are_folded_into_constants() -> None:
    """The fallback for graphs TensorFlow cannot freeze: tf2onnx alone makes the statistics inputs; folded, one input."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from pneumoedge.export.onnx_export import _fold_captured_inputs, _traced

    model = normalization_model(32)
    signature = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)
    _, captured = _traced(lambda x: model(x, training=False), signature, "their model")
    assert len(captured) == 4  # mean and variance of each Normalization layer
    raw, _ = tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)), input_signature=signature, opset=17)
    assert len(raw.graph.input) == 5  # what export used to write
    assert sorted(_fold_captured_inputs(raw, captured)) == sorted(captured)
    assert [i.name for i in raw.graph.input] == ["input"]
    x = np.random.default_rng(4).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    got = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - model.predict(x, verbose=0)).max() < 1e-5


def test_an_onnx_graph_with_extra_inputs_is_refused_by_name() -> None:
    import onnx
    from onnx import TensorProto, helper

    from pneumoedge.export.errors import ExportError
    from pneumoedge.export.onnx_export import _check_single_input

    graph = helper.make_graph(
        [helper.make_node("Sub", ["input", "functional/normalization/Sub/y:0"], ["out"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4]),
         helper.make_tensor_value_info("functional/normalization/Sub/y:0", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])],
    )
    with pytest.raises(ExportError, match=r"expected only 'input' \(extra: 'functional/normalization/Sub/y:0'\)"):
        _check_single_input(helper.make_model(graph), "their model")
    _check_single_input(helper.make_model(helper.make_graph(graph.node, "g", graph.input[:1], graph.output, [onnx.numpy_helper.from_array(np.zeros(4, np.float32), "functional/normalization/Sub/y:0")])), "ok")


def test_logits_head_gets_the_declared_activation(export_base: Path, tmp_path: Path) -> None:
    import pneumoedge
    from pneumoedge.export.errors import ExportError
    from pneumoedge.export.onnx_export import export_keras

    model = logits_model(40)
    spec = PreprocessSpec(height=40, width=40, color="gray", resize="area")
    images = phantom_root(export_base) / "test"
    with pytest.raises(ExportError, match="--head logits"):  # declared probabilities, but outputs are logits
        export_keras(model, tmp_path / "wrong.onnx", spec=spec, labels=LABELS, head="sigmoid", images=images)
    result = export_keras(model, tmp_path / "logits.onnx", spec=spec, labels=LABELS, head="logits", images=images)
    assert result.card.activation == "sigmoid" and result.parity.ok
    files = [f for f in sorted(images.rglob("*")) if f.suffix in (".jpeg", ".png")][:4]
    logits = model.predict(np.stack([preprocess(f, spec) for f in files]), verbose=0)[:, 0]
    ensemble = pneumoedge.load(result.onnx_path)
    for f, logit in zip(files, logits):
        assert ensemble.predict(f).probabilities["PNEUMONIA"] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)


def test_declared_spec_must_match_the_model(tmp_path: Path) -> None:
    from pneumoedge.export.errors import ExportError
    from pneumoedge.export.onnx_export import export_keras

    with pytest.raises(ExportError, match="--color rgb"):
        export_keras(foreign_rgb_model(48), tmp_path / "x.onnx", spec=PreprocessSpec(height=48, width=48, color="gray"), labels=LABELS, head="softmax")
    with pytest.raises(ExportError, match="3 output units but 2 labels"):
        export_keras(foreign_rgb_model(48), tmp_path / "x.onnx", spec=PreprocessSpec(height=48, width=48, color="rgb", scale=1.0), labels=LABELS, head="softmax")


def test_runtime_tensors_equal_training_tensors_for_an_exported_run(export_base: Path) -> None:
    import pneumoedge
    from pneumoedge.datasets import kaggle
    from pneumoedge.export.training import load_arrays

    run = tiny_run(export_base)
    exported = tiny_onnx(export_base)
    samples = kaggle.scan(phantom_root(export_base), split="test")
    x, _ = load_arrays(samples, run.spec, "binary", LABELS)
    ensemble = pneumoedge.load(exported.onnx_path)
    assert ensemble.members[0].card.spec == run.spec  # the spec travelled inside the .onnx
    for i, sample in enumerate(samples):
        (tensor,) = ensemble.tensors(ensemble.decode(sample.path))
        assert np.array_equal(tensor, x[i]), sample.path


def test_runs_to_ensemble_bundle_with_weights(export_base: Path, tmp_path: Path) -> None:
    from pneumoedge.bundle import read_manifest
    from pneumoedge.export.pipeline import export_runs

    run = tiny_run(export_base)
    copy = tmp_path / "second"
    import shutil

    shutil.copytree(run.run_dir, copy)
    result = export_runs([run.run_dir, copy], tmp_path / "bundle", weights=[1.0, 3.0])
    manifest = read_manifest(tmp_path / "bundle")
    assert [m.weight for m in manifest.members] == [1.0, 3.0]
    assert manifest.provenance["synthetic"] is True and "NOT clinically validated" in manifest.provenance["notice"]
    assert 0.0 <= manifest.threshold <= 1.0 and "validation" in manifest.threshold_method
    assert all(m["parity_max_abs_diff"] < 1e-4 for m in manifest.provenance["members"].values())
    assert result.metrics["validation_fp32"]["images"] > 0


def test_no_search_reaches_the_int8_search_for_a_foreign_keras_model(export_base: Path, tmp_path: Path) -> None:
    """`--no-search` is one option of the one bundle builder: a foreign Keras model's int8 tries only the first recipe."""
    from typer.testing import CliRunner

    from pneumoedge.bundle import read_manifest
    from pneumoedge.cli import app

    path = tmp_path / "their_model.keras"
    foreign_rgb_model(32).save(path)
    images = phantom_root(export_base) / "test"
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, [
        "export", str(path), "--out", str(out), "--size", "32", "32", "--color", "rgb", "--scale", "1", "--labels",
        "NORMAL,BACTERIAL,VIRAL", "--head", "softmax", "--images", str(images), "--no-heatmap", "--int8", "--calibration", str(images),
        "--no-search", "--int8-max-diff", "0", "--int8-min-agreement", "1", "--int8-budget", "20",
    ])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    tried = manifest.provenance["int8"]["tried"]
    assert [t["recipe"]["name"] for t in tried] == ["u8s8"], tried  # the search would have tried more: nothing meets max diff 0
    assert manifest.default_precision == "fp32" and manifest.provenance["int8"]["ok"] is False
    # An int8 model that misses the tolerance is not written at all, and the provenance says why.
    assert {m.precision for m in manifest.members} == {"fp32"} and not list(out.glob("*.int8.onnx"))
    assert "max |dp|" in manifest.provenance["int8_withheld"] and "runs fp32" in manifest.provenance["int8_withheld"]
    assert "int8 not written" in result.output
