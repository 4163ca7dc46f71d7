"""Small "foreign" CNN classifiers built with onnx.helper, as PyTorch or tf2onnx would write them.

    NCHW (torch.onnx.export style), pool="gap":
        input (N, C, H, W) -> Conv 3x3 stride s -> Relu (A) -> GlobalAveragePool -> Flatten
            -> Gemm (transB=1) -> [Softmax | Sigmoid] -> output (N, K)
    NCHW, pool="flatten" (a head with no closed-form Grad-CAM):
        ... Relu -> Flatten -> Gemm -> output
    NHWC (tf2onnx / Keras style):
        input (N, H, W, C) -> Transpose -> Conv -> Relu -> Transpose (A, NHWC)
            -> ReduceMean axes [1, 2] -> MatMul -> Add -> [Sigmoid | Softmax] -> output

`forward` computes the same thing in numpy (float64) for hand-written pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def weights(channels_in: int, filters: int, classes: int, seed: int, flat: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv_w": rng.normal(0, 0.5, size=(filters, channels_in, 3, 3)).astype(np.float32),
        "conv_b": rng.normal(0, 0.1, size=(filters,)).astype(np.float32),
        "fc_w": rng.normal(0, 1.0, size=(classes, flat or filters)).astype(np.float32),
        "fc_b": rng.normal(0, 0.1, size=(classes,)).astype(np.float32),
    }


def cnn(
    path: Path,
    *,
    size: tuple[int, int] = (32, 32),
    channels: int = 3,
    layout: str = "NCHW",
    filters: int = 8,
    classes: int = 2,
    head: str = "logits",
    stride: int = 2,
    batch: Union[int, str, None] = "batch",
    pool: str = "gap",
    seed: int = 0,
    opset: int = 17,
    second_input: bool = False,
    second_output: bool = False,
) -> Path:
    """Write a classifier to `path` (see the module docstring) and return the path."""
    h, w = size
    in_shape = [batch, channels, h, w] if layout == "NCHW" else [batch, h, w, channels]
    fh, fw = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    p = weights(channels, filters, classes, seed, flat=filters * fh * fw if pool == "flatten" else 0)
    nodes = []
    x = "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        x = "x_nchw"
    nodes += [
        helper.make_node("Conv", [x, "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride], name="conv"),
        helper.make_node("Relu", ["conv"], ["features"], name="relu"),
    ]
    inits = [numpy_helper.from_array(p["conv_w"], "conv_w"), numpy_helper.from_array(p["conv_b"], "conv_b"),
             numpy_helper.from_array(p["fc_b"], "fc_b")]
    last = "logits" if head == "logits" else "logits_raw"
    if layout == "NHWC":
        nodes += [
            helper.make_node("Transpose", ["features"], ["features_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
            helper.make_node("ReduceMean", ["features_nhwc"], ["pooled"], axes=[1, 2], keepdims=0, name="gap"),
            helper.make_node("MatMul", ["pooled", "fc_w"], ["mm"], name="dense"),
            helper.make_node("Add", ["mm", "fc_b"], [last], name="dense_bias"),
        ]
        inits.append(numpy_helper.from_array(np.ascontiguousarray(p["fc_w"].T), "fc_w"))
    else:
        if pool == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="gap"))
        nodes += [
            helper.make_node("Flatten", ["pooled" if pool == "gap" else "features"], ["flat"], axis=1, name="flatten"),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [last], transB=1, name="fc"),
        ]
        inits.append(numpy_helper.from_array(p["fc_w"], "fc_w"))
    if head == "softmax":
        nodes.append(helper.make_node("Softmax", [last], ["probs"], axis=1, name="softmax"))
    elif head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [last], ["probs"], name="sigmoid"))
    out_name = "logits" if head == "logits" else "probs"
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)]
    if second_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, in_shape))
        nodes.append(helper.make_node("Mul", ["input", "mask"], ["unused_product"], name="mask_mul"))
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, classes])]
    if second_output:
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, filters, None, None]))
    graph = helper.make_graph(nodes, "foreign_cnn", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests.foreign_models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def conv_relu(x: np.ndarray, p: dict[str, np.ndarray], stride: int) -> np.ndarray:
    """(N, C, H, W) float64 -> Relu(Conv 3x3, pad 1, stride) as (N, F, h, w)."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, c, hp, wp = padded.shape
    oh, ow = (hp - 3) // stride + 1, (wp - 3) // stride + 1
    out = np.zeros((n, p["conv_w"].shape[0], oh, ow))
    kernel = p["conv_w"].astype(np.float64)
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += np.einsum("nchw,fc->nfhw", patch, kernel[:, :, i, j])
    return np.maximum(out + p["conv_b"].astype(np.float64)[None, :, None, None], 0.0)


def forward(x_nchw: np.ndarray, *, channels: int, filters: int = 8, classes: int = 2, stride: int = 2, seed: int = 0) -> np.ndarray:
    """The GAP model's logits in float64 numpy, from (N, C, H, W) input."""
    p = weights(channels, filters, classes, seed)
    pooled = conv_relu(np.asarray(x_nchw, dtype=np.float64), p, stride).mean(axis=(2, 3))
    return pooled @ p["fc_w"].astype(np.float64).T + p["fc_b"].astype(np.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def set_opset(path: Path, opset: int, out: Optional[Path] = None) -> Path:
    """Restamp a model's default-domain opset (to make one onnxruntime refuses)."""
    model = onnx.load(str(path))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    target = out or path
    onnx.save(model, str(target))
    return target
