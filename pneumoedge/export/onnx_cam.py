"""Closed-form Grad-CAM outputs added to a foreign ONNX classifier by graph surgery (onnx only).

For a head that is global-average-pool followed by one linear layer (and an optional
Sigmoid/Softmax), the gradient of a logit z_k with respect to the feature map A is W[:, k] / (h*w)
at every position, so Grad-CAM needs no backward pass:

    heatmap = ReLU(sum_c  w_c / (h*w) * A[:, c])

with w = W[:, 1] - W[:, 0] for a 2-unit head (the log-odds of labels[1]), w = W[:, 0] for a
1-unit head, and the predicted class's column (ArgMax + Gather in the graph) for more classes.
Two outputs are appended after the original ones: `pneumoedge_heatmap` (N, h, w) and
`pneumoedge_features` (N, C), the pooled features. Nothing of the original graph is changed or
removed; only nodes named `pneumoedge_cam_*`, their constants and the two outputs are added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from pneumoedge.bundle import FEATURES_OUTPUT, HEATMAP_OUTPUT
from pneumoedge.export.errors import HeatmapUnavailable
from pneumoedge.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

METHOD = "closed-form Grad-CAM (GAP + linear head)"
PREFIX = "pneumoedge_cam_"
NOT_AVAILABLE = "heatmaps not available for this model (head is not global-average-pool + linear)"

#: Ops that only reshape the pooled features between the pool and the linear layer.
_PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity", "Dropout")
_ACTIVATIONS = ("Sigmoid", "Softmax")


@dataclass(frozen=True)
class GapLinearHead:
    """Where the head's parts are: feature map, pooled tensor, linear weights (C, K)."""

    feature_map: str
    pooled: str
    layout: str  # "NCHW" (channels on axis 1) or "NHWC" (channels last)
    weights: np.ndarray  # (C, K): logits = pooled @ weights + bias


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def find_gap_linear_head(graph: Any) -> GapLinearHead:
    """Walk back from output 0: [Sigmoid|Softmax] <- linear <- [Flatten|Reshape..] <- GAP.

    Raises HeatmapUnavailable (with the part that did not fit) for any other head.
    """
    producers = {out: node for node in graph.node for out in node.output}
    consts = _constants(graph)

    def producer(name: str) -> Any:
        node = producers.get(name)
        while node is not None and node.op_type == "Identity":
            node = producers.get(node.input[0])
        return node

    node = producer(graph.output[0].name)
    if node is not None and node.op_type in _ACTIVATIONS:
        node = producer(node.input[0])
    if node is None:
        raise HeatmapUnavailable(f"{NOT_AVAILABLE}: output 0 is not computed by a node")
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or node.input[1] not in consts:
            raise HeatmapUnavailable(f"{NOT_AVAILABLE}: its Gemm does not multiply by constant weights")
        weights = consts[node.input[1]].astype(np.float64)
        weights = (weights.T if _attr(node, "transB", 0) else weights) * float(_attr(node, "alpha", 1.0))
        x = node.input[0]
    else:
        if node.op_type == "Add":
            matmuls = [producer(i) for i in node.input if i not in consts]
            if len(matmuls) != 1 or len(node.input) != 2:
                raise HeatmapUnavailable(f"{NOT_AVAILABLE}: output 0 comes from Add of two computed tensors")
            node = matmuls[0]
        if node is None or node.op_type != "MatMul" or node.input[1] not in consts:
            kind = "nothing" if node is None else node.op_type
            raise HeatmapUnavailable(f"{NOT_AVAILABLE}: the last layer is {kind}, not a linear layer with constant weights")
        weights = consts[node.input[1]].astype(np.float64)
        x = node.input[0]
    if weights.ndim != 2:
        raise HeatmapUnavailable(f"{NOT_AVAILABLE}: linear weights of shape {weights.shape}")
    pooled_node = producer(x)
    while pooled_node is not None and pooled_node.op_type in _PASS_THROUGH:
        pooled_node = producer(pooled_node.input[0])
    if pooled_node is None:
        raise HeatmapUnavailable(f"{NOT_AVAILABLE}: the linear layer's input is the graph input")
    if pooled_node.op_type == "GlobalAveragePool":
        layout = "NCHW"
    elif pooled_node.op_type == "ReduceMean":
        axes = _attr(pooled_node, "axes", None)
        if axes is None and len(pooled_node.input) > 1 and pooled_node.input[1] in consts:
            axes = consts[pooled_node.input[1]].tolist()
        axes = sorted(int(a) % 4 for a in (axes or []))
        if axes == [2, 3]:
            layout = "NCHW"
        elif axes == [1, 2]:
            layout = "NHWC"
        else:
            raise HeatmapUnavailable(f"{NOT_AVAILABLE}: ReduceMean over axes {axes}, not the spatial axes")
    else:
        raise HeatmapUnavailable(f"{NOT_AVAILABLE}: the features come from {pooled_node.op_type}")
    feature_map = pooled_node.input[0]
    before = producer(feature_map)
    if layout == "NHWC" and before is not None and before.op_type == "Transpose" and list(_attr(before, "perm", [])) == [0, 2, 3, 1]:
        # tf2onnx writes NCHW convolutions, then Transpose -> ReduceMean. Read the map before the
        # Transpose: a second consumer after it stops onnxruntime from folding the Transpose into
        # the ReduceMean, which changes output 0 in its last bits.
        feature_map, layout = before.input[0], "NCHW"
    return GapLinearHead(feature_map, pooled_node.output[0], layout, weights)


def _feature_map_shape(model: Any, name: str, spec: PreprocessSpec, fixed_batch: Optional[int]) -> tuple[int, ...]:
    """Run the model once on zeros with the feature map as an extra output: its exact shape."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.zeros((fixed_batch or 1, *spec.input_shape), dtype=np.float32)
    return tuple(session.run([name], {session.get_inputs()[0].name: x})[0].shape)


def score_text(labels: Sequence[str], units: int) -> str:
    """What the heatmap explains, in words."""
    if units == 1:
        return f"logit of {labels[1]}"
    if units == 2:
        return f"log-odds of {labels[1]} against {labels[0]} (logit difference)"
    return "logit of the predicted class"


def default_opset(model: Any) -> int:
    """The model's opset of the default ONNX domain (0 when none is declared)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _Graph:
    """Appends pneumoedge's nodes and constants (names prefixed) to a graph."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(value, PREFIX + name))
        return PREFIX + name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.graph.node.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def add_heatmap_outputs(model: Any, spec: PreprocessSpec, labels: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """A copy of `model` with `pneumoedge_heatmap` and `pneumoedge_features` appended as outputs.

    Args:
        model: an onnx.ModelProto whose one input matches `spec` and whose output 0 is the head.
        spec: the declared preprocessing (to probe the feature map's size).
        labels: label names; labels[1] is the positive one of a binary head.

    Returns:
        (new model, the card's "explain" record). Raises HeatmapUnavailable for other heads.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    taken = {o.name for o in graph.output} | {out for n in graph.node for out in n.output}
    if HEATMAP_OUTPUT in taken or FEATURES_OUTPUT in taken:
        raise HeatmapUnavailable(f"the graph already has a tensor named {HEATMAP_OUTPUT} or {FEATURES_OUTPUT}")
    head = find_gap_linear_head(graph)
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0] if graph.input else None
    fixed_batch = batch_dim.dim_value if batch_dim is not None and batch_dim.HasField("dim_value") else None
    shape = _feature_map_shape(model, head.feature_map, spec, fixed_batch)
    if len(shape) != 4:
        raise HeatmapUnavailable(f"{NOT_AVAILABLE}: the pooled feature map has shape {shape}, not 4-D")
    channels, h, w = (shape[1], shape[2], shape[3]) if head.layout == "NCHW" else (shape[3], shape[1], shape[2])
    if head.weights.shape[0] != channels:
        raise HeatmapUnavailable(f"{NOT_AVAILABLE}: linear weights {head.weights.shape} do not fit {channels} channels")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = _Graph(new.graph)
    raw = _weighted_map(g, head, graph.output[0].name, default_opset(model) >= 12, channels, h, w)
    g.node("Relu", [raw], HEATMAP_OUTPUT)
    # The pooled features are computed again from the map rather than read from the graph's own
    # pooled tensor: a second consumer there, too, changes how onnxruntime optimises the head.
    nchw = head.feature_map if head.layout == "NCHW" else g.node("Transpose", [head.feature_map], PREFIX + "nchw", perm=[0, 3, 1, 2])
    pooled = g.node("GlobalAveragePool", [nchw], PREFIX + "pooled")
    g.node("Flatten", [pooled], FEATURES_OUTPUT, axis=1)
    batch: Any = fixed_batch if fixed_batch else (batch_dim.dim_param if batch_dim is not None and batch_dim.dim_param else "N")
    new.graph.output.append(helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT, [batch, h, w]))
    new.graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, [batch, channels]))
    onnx.checker.check_model(new)
    explain = {
        "heatmap_output": HEATMAP_OUTPUT,
        "features_output": FEATURES_OUTPUT,
        "layer": head.feature_map,
        "score": score_text(labels, head.weights.shape[1]),
        "method": METHOD,
        "layout": head.layout,
        "map_size": [h, w],
    }
    log.info("heatmap outputs added: %s (%s, %dx%d, %d channels); %d nodes added",
             head.feature_map, head.layout, h, w, channels, len(new.graph.node) - len(graph.node))
    return new, explain


def _weighted_map(g: _Graph, head: GapLinearHead, out0: str, einsum: bool, channels: int, h: int, w: int) -> str:
    """The un-rectified map: the feature map weighted by the explained score's gradient, (N, h, w)."""
    # The gradient of a logit with respect to A is W[:, k] / (h*w) at every position: keep the
    # 1/(h*w) so that the map's values are Grad-CAM's, not only its shape.
    per_position = head.weights / float(h * w)
    units = head.weights.shape[1]
    # Einsum (opset 12+) rather than MatMul: int8 quantization (which quantizes MatMul) then
    # leaves the map's weighting in float, and the graph needs no transposes or reshapes.
    maps = "nchw" if head.layout == "NCHW" else "nhwc"
    channels_last = head.feature_map
    if head.layout == "NCHW" and not einsum:
        channels_last = g.node("Transpose", [head.feature_map], PREFIX + "nhwc", perm=[0, 2, 3, 1])
    if units <= 2:
        vector = g.const("weights", (per_position[:, 0] if units == 1 else per_position[:, 1] - per_position[:, 0]).astype(np.float32))
        if einsum:
            return g.node("Einsum", [head.feature_map, vector], PREFIX + "raw", equation=f"{maps},c->nhw")
        return g.node("MatMul", [channels_last, vector], PREFIX + "raw")
    index = g.node("ArgMax", [out0], PREFIX + "class", axis=1, keepdims=0)
    chosen = g.node("Gather", [g.const("weights", np.ascontiguousarray(per_position.T, dtype=np.float32)), index], PREFIX + "class_weights", axis=0)
    if einsum:
        return g.node("Einsum", [head.feature_map, chosen], PREFIX + "raw", equation=f"{maps},nc->nhw")
    column = g.node("Reshape", [chosen, g.const("column_shape", np.array([-1, 1, channels, 1], dtype=np.int64))], PREFIX + "class_column")
    product = g.node("MatMul", [channels_last, column], PREFIX + "product")
    return g.node("Reshape", [product, g.const("map_shape", np.array([-1, h, w], dtype=np.int64))], PREFIX + "raw")
