"""Tiny ONNX models whose outputs can be computed by hand, built with onnx.helper (no TensorFlow).

    input (N, H, W, C) float32
        -> ReduceMean over H, W, C -> m (N, 1)
        -> m * a + b               -> logits (N, K)   (a, b: length-K vectors)
        -> Sigmoid | Softmax | nothing
        -> output
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


def mean_model(
    path: Path,
    spec: PreprocessSpec,
    *,
    a: Sequence[float] = (4.0,),
    b: Sequence[float] = (-2.0,),
    head: str = "sigmoid",
    labels: Sequence[str] = ("NORMAL", "PNEUMONIA"),
    task: str = "binary",
    activation: str = "none",
    metadata: bool = True,
    batch: Optional[int] = None,
    input_shape: Optional[Sequence[int]] = None,
    extra_metadata: Optional[dict] = None,
) -> Path:
    """Write the model above to `path`; with `metadata`, embed its ModelCard."""
    shape = [batch if batch else "N", *(input_shape or spec.input_shape)]
    k = len(a)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m2"]),
        helper.make_node("Mul", ["m2", "a"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logits"]),
    ]
    if head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["output"]))
    elif head == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["output"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "mean_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [shape[0], k])],
        initializer=[
            numpy_helper.from_array(np.asarray(a, dtype=np.float32), "a"),
            numpy_helper.from_array(np.asarray(b, dtype=np.float32), "b"),
            numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if metadata:
        card = ModelCard(spec=spec, labels=tuple(labels), task=task, activation=activation).to_dict()
        card.update(extra_metadata or {})
        helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(card)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def expected_probability(tensor: np.ndarray, a: float, b: float) -> float:
    """Sigmoid head by hand, for one image's tensor."""
    return float(1.0 / (1.0 + np.exp(-(a * float(tensor.astype(np.float64).mean()) + b))))
