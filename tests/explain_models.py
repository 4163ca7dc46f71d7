"""Tiny ONNX models with heatmap and feature outputs, built with onnx.helper (no TensorFlow).

    input (N, H, W, C) float32
        -> ReduceMean over H, W, C -> m -> sigmoid(m * a + b)            -> output (N, 1)
        -> ReduceMean over C -> (N, 1, H, W) -> AveragePool cell x cell -> pooled (N, 1, h, w)
           -> Squeeze -> pooled * sign + shift -> Relu                  -> pneumoedge_heatmap (N, h, w)
           -> [GlobalAveragePool(pooled), GlobalAveragePool(pooled^2)]  -> pneumoedge_features (N, 2)

The heatmap is the image's brightness per cell (sign -1, shift 1: its darkness): a bright
blob must come back as the heatmap's peak at the same place on the original image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pneumoedge.bundle import ONNX_METADATA_KEY, ModelCard
from pneumoedge.preprocessing import PreprocessSpec

EXPLAIN = {
    "heatmap_output": "pneumoedge_heatmap",
    "features_output": "pneumoedge_features",
    "layer": "pooled",
    "score": "log-odds of PNEUMONIA (test model)",
    "method": "test: brightness per cell",
}


def map_model(
    path: Path,
    spec: PreprocessSpec,
    *,
    cell: int = 4,
    a: float = 4.0,
    b: float = -2.0,
    sign: float = 1.0,
    shift: float = 0.0,
    explain: Optional[dict] = None,
    heatmaps: bool = True,
    labels: Sequence[str] = ("NORMAL", "PNEUMONIA"),
) -> Path:
    """Write the model above; `heatmaps=False` leaves out the two extra outputs (an older export)."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m2"]),
        helper.make_node("Mul", ["m2", "a"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
        helper.make_node("ReduceMean", ["input"], ["gray"], axes=[3], keepdims=1),
        helper.make_node("Transpose", ["gray"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Squeeze", ["pooled", "axis1"], ["cells"]),
        helper.make_node("Mul", ["cells", "sign"], ["signed"]),
        helper.make_node("Add", ["signed", "shift"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["pneumoedge_heatmap"]),
        helper.make_node("GlobalAveragePool", ["pooled"], ["f1"]),
        helper.make_node("Mul", ["pooled", "pooled"], ["squared"]),
        helper.make_node("GlobalAveragePool", ["squared"], ["f2"]),
        helper.make_node("Concat", ["f1", "f2"], ["f12"], axis=1),
        helper.make_node("Flatten", ["f12"], ["pneumoedge_features"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])]
    if heatmaps:
        outputs += [
            helper.make_tensor_value_info("pneumoedge_heatmap", TensorProto.FLOAT, ["N", spec.height // cell, spec.width // cell]),
            helper.make_tensor_value_info("pneumoedge_features", TensorProto.FLOAT, ["N", 2]),
        ]
    graph = helper.make_graph(
        nodes,
        "map_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *spec.input_shape])],
        outputs,
        initializer=[
            numpy_helper.from_array(np.asarray([a], dtype=np.float32), "a"),
            numpy_helper.from_array(np.asarray([b], dtype=np.float32), "b"),
            numpy_helper.from_array(np.asarray([sign], dtype=np.float32), "sign"),
            numpy_helper.from_array(np.asarray([shift], dtype=np.float32), "shift"),
            numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    card = ModelCard(spec=spec, labels=tuple(labels), explain=(explain or EXPLAIN) if heatmaps else None)
    helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(card.to_dict())})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def blob_image(height: int, width: int, box: tuple[int, int, int, int], *, background: int = 40, value: int = 230) -> np.ndarray:
    """A dark uint8 image with one bright rectangle (y0, y1, x0, x1)."""
    image = np.full((height, width), background, dtype=np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = value
    return image
