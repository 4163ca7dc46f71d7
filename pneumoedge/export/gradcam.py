"""Grad-CAM inside the exported graph (TensorFlow side): the head in closed form, the check.

onnxruntime computes no gradients, and tf2onnx cannot convert TensorFlow's gradient ops
(StridedSliceGrad, DynamicStitch, ...). So the gradient of the explained score with respect to
the feature layer is built from forward operations only: the layers after the feature layer
must be a chain of global average pooling (or Flatten) and dense-style layers (Dense,
activations, Dropout, BatchNormalization), for which the gradient has a closed form. The
graph then computes, for each image:

    A      = the feature layer's activation (N, h, w, C)
    dS/dA  = backward pass of the score through the head, written with MatMul/Mul only
    alpha  = mean over h, w of dS/dA             (Grad-CAM's channel weights)
    map    = ReLU(sum_c alpha_c * A[..., c])     (N, h, w), un-normalised
    pooled = mean over h, w of A                 (N, C), the features the OOD score reads

The score is the positive label's log-odds for a binary model (the pre-sigmoid logit of a
1-unit head; z_pos - z_neg for a 2-unit head) and the predicted label's logit for more
classes. `gradcam_reference` computes the same map with `tf.GradientTape` through Keras's own
sub-models, and export refuses a graph whose maps do not correlate with it. Finding the feature
layer and cutting the model there is in `feature_layer`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pneumoedge.bundle import FEATURES_OUTPUT, HEATMAP_OUTPUT
from pneumoedge.export.errors import HeatmapUnavailable
from pneumoedge.export.feature_layer import (
    all_tensors,
    body_layers,
    input_of,
    tail_layers,
    body_function,
    find_feature_layer,
)

log = logging.getLogger(__name__)

#: Smallest per-image Pearson correlation accepted between the ONNX maps and TensorFlow's.
DEFAULT_MIN_CORRELATION = 0.99
METHOD = "Grad-CAM (gradient at the feature layer in closed form through the dense head)"


@dataclass
class HeatmapReport:
    """ONNX heatmaps against TensorFlow's Grad-CAM (GradientTape) on the same images."""

    layer: str
    min_correlation: float
    mean_correlation: float
    images: int
    empty_maps: int
    threshold: float

    @property
    def ok(self) -> bool:
        return self.min_correlation >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---------------------------------------------------------------------------------------------
# the head in closed form


_ELEMENTWISE = ("relu", "linear", "tanh", "sigmoid", "silu", "swish")


def _activation_name(fn: Any) -> str:
    return getattr(fn, "__name__", str(fn)).lower()


@dataclass
class _Step:
    """One head layer: forward (h -> h') and how it maps a gradient back (g' -> g)."""

    kind: str
    layer: Any


class ClosedFormHead:
    """The chain of layers after the feature layer, with its gradient in closed form."""

    def __init__(self, layers: Sequence[Any], labels: int) -> None:
        import keras

        if not layers:
            raise HeatmapUnavailable("the feature layer is the model's output: nothing to explain")
        pool, *rest = layers
        if isinstance(pool, keras.layers.GlobalAveragePooling2D):
            self.pool = "average"
        elif isinstance(pool, keras.layers.Flatten):
            self.pool = "flatten"
        else:
            raise HeatmapUnavailable(
                f"the layer after the feature layer is {type(pool).__name__} ({pool.name}); heatmaps need "
                "global average pooling or Flatten followed by dense layers"
            )
        self.steps: list[_Step] = []
        for layer in rest:
            self.steps.append(_Step(self._kind(layer), layer))
        last = self.steps[-1] if self.steps else None
        if last is None or last.kind not in ("dense", "activation"):
            raise HeatmapUnavailable("the head does not end in a Dense layer")
        self.labels = labels

    @staticmethod
    def _kind(layer: Any) -> str:
        import keras

        if isinstance(layer, keras.layers.Dense):
            name = _activation_name(layer.activation)
            if name not in _ELEMENTWISE + ("softmax",):
                raise HeatmapUnavailable(f"{layer.name}: activation {name!r} has no closed-form gradient here")
            return "dense"
        if isinstance(layer, (keras.layers.Dropout, keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.AlphaDropout)):
            return "identity"
        if isinstance(layer, keras.layers.BatchNormalization):
            return "batchnorm"
        if isinstance(layer, keras.layers.ReLU):
            if layer.max_value is not None or float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
                raise HeatmapUnavailable(f"{layer.name}: a clipped or leaky ReLU is not supported for heatmaps")
            return "relu"
        if isinstance(layer, keras.layers.Activation):
            name = _activation_name(layer.activation)
            if name not in _ELEMENTWISE + ("softmax",):
                raise HeatmapUnavailable(f"{layer.name}: activation {name!r} has no closed-form gradient here")
            return "activation"
        raise HeatmapUnavailable(
            f"{layer.name} ({type(layer).__name__}) after the feature layer: heatmaps need a head of pooling, "
            "Dense, Dropout, BatchNormalization and activation layers"
        )

    def __call__(self, A: Any) -> tuple[Any, Any, Any]:
        """A (N, h, w, C) -> (model output, heatmap (N, h, w), pooled features (N, C))."""
        import tensorflow as tf

        pooled = tf.reduce_mean(A, axis=[1, 2])
        h = pooled if self.pool == "average" else tf.reshape(A, [-1, int(np.prod(A.shape[1:]))])
        backward: list[Callable[[Any], Any]] = []
        output = None
        for index, step in enumerate(self.steps):
            final = index == len(self.steps) - 1
            layer = step.layer
            if step.kind == "identity":
                continue
            if step.kind == "batchnorm":
                h = layer(h, training=False)
                scale = layer.gamma if layer.scale else tf.ones_like(layer.moving_variance)
                factor = scale / tf.sqrt(layer.moving_variance + layer.epsilon)
                backward.append(lambda g, f=factor: g * f)
                continue
            if step.kind == "dense":
                kernel = tf.convert_to_tensor(layer.kernel)
                z = tf.matmul(h, kernel)
                if layer.use_bias:
                    z = z + layer.bias
                backward.append(lambda g, k=kernel: tf.matmul(g, k, transpose_b=True))
                name = _activation_name(layer.activation)
            else:
                z, name = h, ("relu" if step.kind == "relu" else _activation_name(layer.activation))
            if final:
                output = _final_activation(z, name)
                logits = z
                break
            h = self._elementwise(z, name, backward)
        gradient = tf.stop_gradient(self._score_vector(logits))
        for step_back in reversed(backward):
            gradient = step_back(gradient)
        if self.pool == "average":
            hw = tf.cast(tf.shape(A)[1] * tf.shape(A)[2], A.dtype)
            alpha = gradient / hw  # dS/dA is dS/dpooled / (h*w) at every position
        else:
            alpha = tf.reduce_mean(tf.reshape(gradient, tf.shape(A)), axis=[1, 2])
        heatmap = tf.nn.relu(tf.reduce_sum(A * alpha[:, None, None, :], axis=-1))
        return output, heatmap, pooled

    @staticmethod
    def _elementwise(z: Any, name: str, backward: list) -> Any:
        import tensorflow as tf

        if name == "linear":
            return z
        if name == "relu":
            out = tf.nn.relu(z)
            mask = tf.cast(z > 0, z.dtype)
            backward.append(lambda g, m=mask: g * m)
            return out
        if name == "tanh":
            out = tf.tanh(z)
            backward.append(lambda g, o=out: g * (1.0 - o * o))
            return out
        if name == "sigmoid":
            out = tf.sigmoid(z)
            backward.append(lambda g, o=out: g * o * (1.0 - o))
            return out
        if name in ("silu", "swish"):
            s = tf.sigmoid(z)
            backward.append(lambda g, s=s, z=z: g * (s * (1.0 + z * (1.0 - s))))
            return z * s
        raise HeatmapUnavailable(f"activation {name!r} inside the head has no closed-form gradient here")

    def _score_vector(self, logits: Any) -> Any:
        """dS/dlogits: the positive label's log-odds for binary heads, the predicted label otherwise."""
        import tensorflow as tf

        width = int(logits.shape[-1])
        ones = tf.ones_like(logits[:, :1])
        if width == 1:
            return ones
        if width == 2 and self.labels == 2:
            return tf.concat([-ones, ones], axis=1)
        return tf.one_hot(tf.argmax(logits, axis=1), width, dtype=logits.dtype)


def _final_activation(z: Any, name: str) -> Any:
    import tensorflow as tf

    if name == "sigmoid":
        return tf.sigmoid(z)
    if name == "softmax":
        return tf.nn.softmax(z, axis=-1)
    if name == "linear":
        return z
    raise HeatmapUnavailable(f"the output layer's activation {name!r} is not sigmoid, softmax or linear")


@dataclass
class ExplainedModel:
    """A Keras model split at its feature layer: `call(x)` -> (output, heatmap, pooled features)."""

    keras_model: Any
    path: list
    body: Callable[[Any], Any]
    head: ClosedFormHead

    @property
    def layer(self) -> str:
        return "/".join(layer.name for layer in self.path)

    def call(self, x: Any) -> tuple[Any, Any, Any]:
        return self.head(self.body(x))

    def card_entry(self, score: str) -> dict[str, Any]:
        return {
            "heatmap_output": HEATMAP_OUTPUT,
            "features_output": FEATURES_OUTPUT,
            "layer": self.layer,
            "score": score,
            "method": METHOD,
        }


def explain_model(keras_model: Any, labels: int, layer: Optional[str] = None) -> ExplainedModel:
    """Split `keras_model` at its feature layer (automatic, or `layer`) for heatmaps in the graph.

    Raises `HeatmapUnavailable` with the reason when the structure does not allow it.
    """
    path = find_feature_layer(keras_model, layer)
    try:
        body = body_function(keras_model, path)
    except (ValueError, AttributeError, IndexError) as exc:
        raise HeatmapUnavailable(f"cannot cut the model at {path[-1].name}: {exc}") from None
    head = ClosedFormHead(tail_layers(keras_model, path), labels)
    return ExplainedModel(keras_model, list(path), body, head)


def score_description(labels: Sequence[str], outputs: int) -> str:
    if len(labels) == 2:
        what = "pre-sigmoid logit" if outputs == 1 else f"z_{labels[1]} - z_{labels[0]}"
        return f"log-odds of {labels[1]} ({what})"
    return "logit of the predicted label"


# ---------------------------------------------------------------------------------------------
# the reference: Grad-CAM by GradientTape through Keras's own sub-models


def gradcam_reference(explained: ExplainedModel, tensors: np.ndarray, labels: int) -> np.ndarray:
    """TensorFlow's Grad-CAM (GradientTape) at the feature layer: (N, h, w), un-normalised."""
    import tensorflow as tf

    head_logits = _keras_head_logits(explained.keras_model, explained.path)
    maps = []
    for start in range(0, len(tensors), 16):
        x = tf.constant(tensors[start : start + 16])
        A = explained.body(x)
        with tf.GradientTape() as tape:
            tape.watch(A)
            z = head_logits(A)
            if z.shape[-1] == 1:
                score = z[:, 0]
            elif z.shape[-1] == 2 and labels == 2:
                score = z[:, 1] - z[:, 0]
            else:
                score = tf.reduce_sum(z * tf.one_hot(tf.argmax(z, axis=1), z.shape[-1]), axis=1)
        grads = tape.gradient(score, A)
        alpha = tf.reduce_mean(grads, axis=[1, 2])
        maps.append(tf.nn.relu(tf.einsum("nhwc,nc->nhw", A, alpha)).numpy())
    return np.concatenate(maps)


def _keras_head_logits(model: Any, path: Sequence[Any]) -> Callable[[Any], Any]:
    """A -> the output layer's pre-activation, composed of Keras sub-models (no closed form)."""
    import keras
    import tensorflow as tf

    parts: list[Callable[[Any], Any]] = []
    for depth in range(len(path) - 1, -1, -1):
        owner = model if depth == 0 else path[depth - 1]
        start = path[depth].output if depth == len(path) - 1 else _output_in(owner, path[depth])
        end = owner.outputs[0]
        if depth == 0:
            last = body_layers(owner)[-1]
            end = input_of(owner, last)
            final = last
        if start is not end:
            try:
                sub = keras.Model(start, end)
            except ValueError:
                # Keras cannot always cut a model loaded from a file at a nested model's output:
                # then the head's own layers are called in order (still TensorFlow's autodiff).
                return _layer_chain_logits(model, path)
            parts.append(lambda a, s=sub: s(a, training=False))

    def logits(A: Any) -> Any:
        h = A
        for part in parts:
            h = part(h)
        if isinstance(final, keras.layers.Dense):
            z = tf.matmul(h, final.kernel)
            return z + final.bias if final.use_bias else z
        return h  # an Activation layer: its input is the logits

    return logits


def _layer_chain_logits(model: Any, path: Sequence[Any]) -> Callable[[Any], Any]:
    """A -> pre-activation by calling the layers after the feature layer one by one."""
    import keras
    import tensorflow as tf

    *chain, final = tail_layers(model, path)

    def logits(A: Any) -> Any:
        h = A
        for layer in chain:
            h = layer(h, training=False)
        if isinstance(final, keras.layers.Dense):
            z = tf.matmul(h, final.kernel)
            return z + final.bias if final.use_bias else z
        return h

    return logits


def _output_in(owner: Any, layer: Any) -> Any:
    """The output tensor of nested `layer` inside `owner`'s graph."""
    tensors = {id(t) for t in all_tensors(owner)}
    for node in layer._inbound_nodes:
        if any(id(t) in tensors for t in node.input_tensors):
            return node.output_tensors[0]
    return layer._inbound_nodes[-1].output_tensors[0]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; two constant maps that are equal correlate perfectly."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-12)
    if na <= 1e-9 * scale * np.sqrt(a.size) or nb <= 1e-9 * scale * np.sqrt(b.size):
        # A constant map (often all zero after the ReLU) is an answer: it matches only a constant.
        return 1.0 if np.allclose(a, b, atol=1e-5 * scale) else 0.0
    return float((da * db).sum() / (na * nb))


def compare_maps(onnx_maps: np.ndarray, reference: np.ndarray, layer: str, threshold: float = DEFAULT_MIN_CORRELATION) -> HeatmapReport:
    """Per-image Pearson correlation of ONNX maps with the reference maps."""
    correlations = [pearson(a, b) for a, b in zip(onnx_maps, reference)]
    empty = int(sum(1 for m in reference if float(np.max(m)) <= 0.0))
    return HeatmapReport(
        layer=layer,
        min_correlation=float(min(correlations)),
        mean_correlation=float(np.mean(correlations)),
        images=len(correlations),
        empty_maps=empty,
        threshold=float(threshold),
    )
