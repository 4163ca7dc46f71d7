"""Heatmaps built into the exported graph, checked against TensorFlow's GradientTape Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoedge.preprocessing import PreprocessSpec
from tests.export_helpers import (  # noqa: F401 (fixture)
    export_base,
    phantom_root,
    randomize_batchnorm,
    tiny_run,
)

pytestmark = pytest.mark.slow
LABELS = ("NORMAL", "PNEUMONIA")


@pytest.fixture(autouse=True)
def _needs_tensorflow() -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")


def _images(export_base: Path) -> Path:
    return phantom_root(export_base) / "test"


@pytest.mark.parametrize("arch, size, layer", [("cnn3_gray150", 64, "b2_pool"), ("cnn4_gray256", 64, "b3_pool")])
def test_founding_architectures_export_heatmaps_that_match_gradienttape(export_base: Path, tmp_path: Path, arch: str, size: int, layer: str) -> None:
    import onnx

    import pneumoedge
    from pneumoedge.export.architectures import get_architecture
    from pneumoedge.export.onnx_export import export_keras

    model = randomize_batchnorm(get_architecture(arch).build(size=(size, size)))
    spec = get_architecture(arch).default_spec((size, size))
    result = export_keras(model, tmp_path / "m.onnx", spec=spec, labels=LABELS, images=_images(export_base))
    report = result.heatmap
    assert report is not None and report.layer == layer and report.ok and report.min_correlation >= 0.99
    assert result.card.explain["score"].startswith("log-odds of PNEUMONIA")
    outputs = [o.name for o in onnx.load(str(result.onnx_path)).graph.output]
    assert outputs[1:] == ["pneumoedge_heatmap", "pneumoedge_features"]
    ensemble = pneumoedge.load(result.onnx_path)
    assert ensemble.can_explain and ensemble.members[0].heatmap_output == "pneumoedge_heatmap"


def _nested_mobilenet_logits(size: int = 64):
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    backbone = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, include_top=False, weights=None)
    return keras.Sequential(
        [keras.Input((size, size, 3)), layers.Rescaling(1 / 127.5, offset=-1), backbone, layers.GlobalAveragePooling2D(), layers.Dropout(0.2), layers.Dense(2)],
        name="their_model",
    )


def test_nested_keras_applications_backbone_with_logits_head(export_base: Path, tmp_path: Path) -> None:
    from pneumoedge.export.onnx_export import export_keras

    model = _nested_mobilenet_logits()
    model.save(tmp_path / "their_model.keras")  # loaded back from the file, as a user exports it
    spec = PreprocessSpec(height=64, width=64, color="rgb", resize="bilinear", scale=1.0)
    result = export_keras(tmp_path / "their_model.keras", tmp_path / "m.onnx", spec=spec, labels=LABELS, head="logits", images=_images(export_base), parity_count=12)
    assert result.heatmap is not None and result.heatmap.ok
    assert result.heatmap.layer.startswith("mobilenetv2") and result.heatmap.layer.endswith("out_relu")
    assert "z_PNEUMONIA - z_NORMAL" in result.card.explain["score"]


def test_pooling_inside_a_nested_model_and_a_three_class_softmax(export_base: Path, tmp_path: Path) -> None:
    import keras
    from keras import layers

    from pneumoedge.export.onnx_export import export_keras

    keras.utils.set_random_seed(4)
    inner_in = keras.Input((48, 48, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inner_in)
    y = layers.Conv2D(8, 3, padding="same")(x)
    x = layers.ReLU()(layers.Add()([x, y]))  # a residual: the backbone is not a chain
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="last_conv")(x)
    backbone = keras.Model(inner_in, layers.GlobalAveragePooling2D(name="inner_gap")(x), name="backbone")
    outer_in = keras.Input((48, 48, 3))
    hidden = layers.BatchNormalization()(layers.Dense(12, activation="relu")(backbone(outer_in)))
    model = randomize_batchnorm(keras.Model(outer_in, layers.Dense(3, activation="softmax")(hidden)))
    spec = PreprocessSpec(height=48, width=48, color="rgb", resize="bilinear")
    result = export_keras(model, tmp_path / "m.onnx", spec=spec, labels=("NORMAL", "BACTERIAL", "VIRAL"), head="softmax", images=_images(export_base), parity_count=12)
    assert result.heatmap.layer == "backbone/last_conv" and result.heatmap.ok
    assert result.card.explain["score"] == "logit of the predicted label"


def test_a_head_without_closed_form_still_exports_the_classifier(export_base: Path, tmp_path: Path) -> None:
    import keras
    from keras import layers

    import pneumoedge
    from pneumoedge.export.onnx_export import export_keras

    inputs = keras.Input((40, 40, 1))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(layers.GlobalMaxPooling2D()(x)))
    result = export_keras(model, tmp_path / "m.onnx", spec=PreprocessSpec(height=40, width=40), labels=LABELS, images=_images(export_base), parity_count=8)
    assert result.heatmap is None and "GlobalMaxPooling2D" in result.heatmap_note and result.parity.ok
    assert result.card.explain is None
    assert not pneumoedge.load(result.onnx_path).can_explain


def test_heatmap_layer_by_name_and_clear_refusals(export_base: Path, tmp_path: Path) -> None:
    from pneumoedge.export.architectures import get_architecture
    from pneumoedge.export.errors import ExportError, ParityError
    from pneumoedge.export.onnx_export import export_keras

    model = randomize_batchnorm(get_architecture("cnn3_gray150").build(size=(64, 64)))
    spec = get_architecture("cnn3_gray150").default_spec((64, 64))
    images = _images(export_base)
    # An earlier layer: its head is not pooling + dense, so it is refused by name, not silently replaced.
    with pytest.raises(ExportError, match="b1_pool"):
        export_keras(model, tmp_path / "a.onnx", spec=spec, labels=LABELS, images=images, heatmap_layer="b1_pool", parity_count=8)
    with pytest.raises(ExportError, match="no such layer"):
        export_keras(model, tmp_path / "b.onnx", spec=spec, labels=LABELS, images=images, heatmap_layer="nope", parity_count=8)
    with pytest.raises(ParityError, match="correlate"):
        export_keras(model, tmp_path / "c.onnx", spec=spec, labels=LABELS, images=images, heatmap_correlation=1.01, parity_count=8)
    assert not (tmp_path / "c.onnx").exists()
    result = export_keras(model, tmp_path / "d.onnx", spec=spec, labels=LABELS, images=images, heatmaps=False, parity_count=8)
    assert result.card.explain is None and result.heatmap is None


def test_reinitialised_head_or_last_block_gives_different_maps(export_base: Path) -> None:
    """Adebayo et al. 2018: maps that survive randomising the model explain nothing about it.

    The real figure is measured on the default bundle (scripts/measure_heatmaps.py); here, a
    seeded model's maps must change when its dense head or its last convolution is redrawn.
    """
    import keras

    from pneumoedge.export.architectures import get_architecture
    from pneumoedge.export.gradcam import explain_model, gradcam_reference, pearson
    from pneumoedge.export.tensors import load_tensors

    keras.utils.set_random_seed(21)
    model = randomize_batchnorm(get_architecture("cnn3_gray150").build(size=(64, 64)))
    for name in ("hidden", "probability"):  # a positive head: every feature raises the score, maps are not empty
        kernel, bias = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([np.abs(kernel), np.abs(bias)])
    spec = get_architecture("cnn3_gray150").default_spec((64, 64))
    files = [f for f in sorted(_images(export_base).rglob("*")) if f.suffix in (".jpeg", ".png")][:16]
    x = load_tensors(files, spec)
    original = gradcam_reference(explain_model(model, 2), x, 2)
    assert sum(m.max() > 0 for m in original) >= 4
    # A redrawn head changes the channel weights: the maps must decorrelate. A redrawn last
    # convolution keeps part of the image's structure (Adebayo et al. saw the same): they differ.
    for prefix, bound in (("hidden", 0.8), ("b2_conv", 0.99)):
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        rng = np.random.default_rng(5)
        for layer in copy.layers:
            if layer.name.startswith(prefix):
                layer.set_weights([rng.normal(0, 0.2, w.shape).astype("float32") for w in layer.get_weights()])
        redrawn = gradcam_reference(explain_model(copy, 2), x, 2)
        pairs = [(a, b) for a, b in zip(original, redrawn) if a.max() > 0 or b.max() > 0]
        mean_r = float(np.mean([pearson(a, b) for a, b in pairs]))
        assert len(pairs) >= 4 and mean_r < bound, (prefix, mean_r)
