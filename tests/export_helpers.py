"""Helpers for the training-side tests: tiny phantom data sets, one tiny trained run, Keras model builders.

Expensive things (the data set, the trained run, its ONNX export) are built once per test
session and cached here, whichever test module asks first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY = (64, 64)
_CACHE: dict[str, Any] = {}


def tiny_counts(n: int = 12) -> dict[str, dict[str, int]]:
    return {
        "train": {"normal": 2 * n, "bacteria": n, "virus": n},
        "test": {"normal": n // 2, "bacteria": n // 4 or 1, "virus": n // 4 or 1},
    }


def phantom_root(base: Path) -> Path:
    """A small Kaggle-layout phantom data set (96 px, a third of the images 16-bit PNG), cached."""
    if "data" not in _CACHE:
        from pneumoedge.datasets import phantoms

        _CACHE["data"] = phantoms.generate_dataset(base / "phantoms", counts=tiny_counts(), size=(96, 96), seed=3, sixteen_bit_fraction=0.34)
    return _CACHE["data"]


def tiny_run(base: Path) -> Any:
    """A cnn3_gray150 run at 64 px, 2 epochs, on `phantom_root` (RunResult), cached."""
    if "run" not in _CACHE:
        from pneumoedge.export.training import TrainingOptions, train

        _CACHE["run"] = train(phantom_root(base), "cnn3_gray150", base / "runs" / "cnn3", TrainingOptions(epochs=2, size=TINY, batch_size=16, seed=1, patience=2))
    return _CACHE["run"]


def tiny_onnx(base: Path) -> Any:
    """The tiny run exported to ONNX (ExportResult), cached."""
    if "onnx" not in _CACHE:
        from pneumoedge.export.onnx_export import export_keras

        run = tiny_run(base)
        _CACHE["onnx"] = export_keras(run.run_dir, base / "tiny.onnx", spec=run.spec, labels=run.labels, images=phantom_root(base) / "test")
    return _CACHE["onnx"]


@pytest.fixture(scope="session")
def export_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "base" not in _CACHE:
        _CACHE["base"] = tmp_path_factory.mktemp("export")
    return _CACHE["base"]


def randomize_batchnorm(model: Any, seed: int = 0) -> Any:
    """Give BatchNormalization layers non-trivial statistics, so parity tests exercise them."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.1, beta.shape).astype("float32"),
                rng.normal(0, 0.1, mean.shape).astype("float32"),
                rng.uniform(0.5, 2.0, var.shape).astype("float32"),
            ])
    return model


def mixed_layers_model(size: int = 64) -> Any:
    """Conv, BN, max and average pooling, separable conv, dropout, dense, GAP: one sigmoid unit."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    inputs = keras.Input((size, size, 1))
    x = layers.Conv2D(8, 3, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.SeparableConv2D(16, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Conv2D(16, 3, strides=2, padding="valid", activation="elu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(12, activation="tanh")(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    return randomize_batchnorm(keras.Model(inputs, outputs))


def foreign_rgb_model(size: int = 48) -> Any:
    """A 'their model' style network: RGB input in 0..255, Rescaling inside, 3-way softmax head."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def logits_model(size: int = 40) -> Any:
    """A binary model trained 'from_logits': one linear unit with a large bias (outputs outside 0..1)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(11)
    inputs = keras.Input((size, size, 1))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(1, bias_initializer=keras.initializers.Constant(2.5))(x)
    return keras.Model(inputs, outputs)


def normalization_model(size: int = 32) -> Any:
    """EfficientNet-style input stem: Rescaling, then Normalization layers with real statistics.

    Keras 3 keeps Normalization's mean and variance as eager tensors, not variables: the case
    that once became extra ONNX graph inputs. One layer is adapted per channel (as EfficientNet's
    is built), one has its statistics given; neither is the identity (mean 0, variance 1).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(13)
    rng = np.random.default_rng(13)
    adapted = layers.Normalization(axis=-1)
    sample = rng.uniform(0.0, 1.0, (16, size, size, 3)).astype("float32") * np.array([0.9, 0.6, 0.3], "float32") + 0.05
    adapted.adapt(sample)
    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = adapted(x)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.Normalization(axis=None, mean=0.3, variance=2.5)(x)
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs)
