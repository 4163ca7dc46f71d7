"""The feature layer of a Keras model (nested models too), and the model cut there: body and tail."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from pneumoedge.export.errors import HeatmapUnavailable


# ---------------------------------------------------------------------------------------------
# finding the feature layer, possibly inside a nested model


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _output_rank(layer: Any) -> Optional[int]:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def body_layers(model: Any) -> list:
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def find_feature_layer(model: Any, name: Optional[str] = None) -> list:
    """The path (outer model's layer, ..., the layer) to the feature layer.

    Without `name`, the last layer with a 4-D output, looking inside nested models (a
    keras.applications backbone used as a layer). Raises `HeatmapUnavailable` when none exists
    or `name` is not found.
    """
    if name is None:
        path = _last_4d(model)
        if path is None:
            raise HeatmapUnavailable(f"{model.name}: no layer with a 4-D (N, H, W, C) output to explain")
        return path
    path = _named(model, name)
    if path is None:
        raise HeatmapUnavailable(f"--heatmap-layer {name!r}: no such layer in {model.name} or its nested models")
    if _output_rank(path[-1]) != 4:
        raise HeatmapUnavailable(f"--heatmap-layer {name!r}: its output is not 4-D (N, H, W, C); choose a convolutional layer")
    return path


def _last_4d(model: Any) -> Optional[list]:
    for layer in reversed(body_layers(model)):
        if _is_model(layer):
            inner = _last_4d(layer)
            if inner is not None:
                return [layer, *inner]
        elif _output_rank(layer) == 4:
            return [layer]
    return None


def _named(model: Any, name: str) -> Optional[list]:
    for layer in body_layers(model):
        if layer.name == name:
            return [layer]
        if _is_model(layer):
            inner = _named(layer, name)
            if inner is not None:
                return [layer, *inner]
    return None


# ---------------------------------------------------------------------------------------------
# splitting the model: body (image -> A) and head (A -> output), both from Keras's own graph


def input_of(model: Any, layer: Any) -> Any:
    """The tensor that feeds `layer` inside `model`'s graph."""
    nodes = [n for n in layer._inbound_nodes if any(t is i for t in n.input_tensors for i in all_tensors(model))]
    node = nodes[-1] if nodes else layer._inbound_nodes[-1]
    return node.input_tensors[0]


def all_tensors(model: Any) -> list:
    tensors = list(model.inputs)
    for layer in model.layers:
        for node in layer._inbound_nodes:
            tensors.extend(node.output_tensors)
    return tensors


def _sub(model: Any, inputs: Any, outputs: Any) -> Callable[[Any], Any]:
    """inputs -> outputs of `model`'s graph as a callable (identity when they are the same tensor)."""
    import keras

    if outputs is inputs:
        return lambda x: x
    sub = keras.Model(inputs, outputs)
    return lambda x: sub(x, training=False)


def body_function(model: Any, path: Sequence[Any]) -> Callable[[Any], Any]:
    """image batch -> the feature layer's activation A."""
    first = path[0]
    if len(path) == 1:
        return _sub(model, model.inputs[0], first.output)
    before = _sub(model, model.inputs[0], input_of(model, first))
    inner = body_function(first, path[1:])
    return lambda x: inner(before(x))


def tail_layers(model: Any, path: Sequence[Any]) -> list:
    """The layers after the feature layer, innermost model first, then each enclosing model."""
    if len(path) > 1:
        inner = tail_layers(path[0], path[1:])
    else:
        inner = []
    layers = body_layers(model)
    index = next(i for i, layer in enumerate(layers) if layer is path[0])
    return inner + layers[index + 1 :]
