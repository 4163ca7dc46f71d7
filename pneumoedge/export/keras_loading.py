"""Loading a Keras model (a .keras/.h5 file, a SavedModel, a run folder, or in memory) for export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from pneumoedge.export.errors import ExportError
from pneumoedge.preprocessing import PreprocessSpec


@dataclass
class KerasModel:
    """A loaded Keras model or SavedModel reduced to what export needs: one image in, one out."""

    call: Callable[[Any], Any]  # tf tensor (N,H,W,C) -> tf tensor (N,K)
    input_shape: tuple[Optional[int], ...]  # (H, W, C), entries may be None
    description: str
    keras_model: Any = None

    def predict(self, tensors: np.ndarray, batch_size: int = 16) -> np.ndarray:
        import tensorflow as tf

        outputs = []
        for start in range(0, len(tensors), batch_size):
            outputs.append(np.asarray(self.call(tf.constant(tensors[start : start + batch_size]))))
        return np.concatenate(outputs, axis=0).reshape(len(tensors), -1)


def load_keras(source: Union[str, Path, Any]) -> KerasModel:
    """Load a `.keras`/`.h5` file, a SavedModel folder, or wrap an in-memory Keras model."""
    import tensorflow as tf

    if not isinstance(source, (str, Path)):
        return _wrap_keras(source, f"in-memory Keras model {getattr(source, 'name', '')}")
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{path}: no such model file or folder")
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"  # a pneumoedge run folder
    if path.is_file():
        import keras

        if path.suffix not in (".keras", ".h5", ".hdf5"):
            raise ExportError(f"{path}: expected a .keras or .h5 file, or a SavedModel folder")
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for unreadable files
            raise ExportError(f"{path}: Keras cannot load this model: {exc}") from None
        return _wrap_keras(model, str(path))
    if (path / "saved_model.pb").is_file():
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:
            raise ExportError(f"{path}: TensorFlow cannot load this SavedModel: {exc}") from None
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise ExportError(f"{path}: the SavedModel has no 'serving_default' signature")
        specs = signature.structured_input_signature[1]
        if len(specs) != 1:
            raise ExportError(f"{path}: the SavedModel has {len(specs)} inputs; pneumoedge exports one-image models")
        (input_name, input_spec), = specs.items()

        def call(x: Any) -> Any:
            outputs = signature(**{input_name: x})
            if len(outputs) != 1:
                raise ExportError(f"{path}: the SavedModel has {len(outputs)} outputs; expected one")
            return next(iter(outputs.values()))

        call.__keep = loaded  # keep the trackable alive with the closure
        return KerasModel(call, tuple(input_spec.shape[1:]), f"SavedModel {path}")
    raise ExportError(f"{path}: a folder, but neither a SavedModel (saved_model.pb) nor a pneumoedge run (model.keras)")


def _wrap_keras(model: Any, description: str) -> KerasModel:
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    if len(inputs) != 1:
        raise ExportError(f"{description}: has {len(inputs)} inputs; pneumoedge exports one-image models")
    if len(outputs) != 1:
        raise ExportError(f"{description}: has {len(outputs)} outputs; pneumoedge exports one-output models")
    shape = tuple(inputs[0].shape[1:])
    if len(shape) != 3:
        raise ExportError(f"{description}: input shape {shape} is not an image (H, W, C)")
    return KerasModel(lambda x: model(x, training=False), shape, description, keras_model=model)


def check_spec_matches(model: KerasModel, spec: PreprocessSpec) -> None:
    if spec.layout != "NHWC":
        raise ExportError("Keras models take NHWC input; declare layout NHWC")
    want = spec.input_shape
    for have, need, what in zip(model.input_shape, want, ("height", "width", "channels")):
        if have is not None and int(have) != need:
            raise ExportError(
                f"{model.description}: model input is {tuple(model.input_shape)} but the spec gives {want}; "
                f"the declared {what} ({need}) must match the model ({have})"
                + (" — use --color rgb for 3 channels, gray for 1" if what == "channels" else "")
            )
