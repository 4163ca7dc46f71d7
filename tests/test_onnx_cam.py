"""Closed-form Grad-CAM outputs added to foreign ONNX graphs (pneumoedge.export.onnx_cam).

The reference is Grad-CAM by its definition, computed independently: the score's gradient with
respect to the feature map A by central finite differences (float64), averaged over space per
channel, then ReLU(sum_c alpha_c A_c).

    NCHW: input -> Conv -> Relu (A) -> GlobalAveragePool -> Flatten -> Gemm -> [Softmax|Sigmoid]
    NHWC: input -> Transpose -> Conv -> Relu (A) -> Transpose -> ReduceMean[1,2] -> MatMul -> Add
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pneumoedge.export.onnx_cam import NOT_AVAILABLE, HeatmapUnavailable, add_heatmap_outputs
from pneumoedge.export.onnx_wrap import wrap_onnx
from pneumoedge.preprocessing import PreprocessSpec
from pneumoedge.runtime.sessions import create_session
from tests.foreign_models import cnn, weights

LABELS2 = ("NORMAL", "PNEUMONIA")
LABELS3 = ("NORMAL", "BACTERIA", "VIRUS")


def _session(model: onnx.ModelProto, *, runtime: bool = False) -> ort.InferenceSession:
    if runtime:
        return create_session(model.SerializeToString(), "cpu", threads=1)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def gradcam_by_finite_differences(a: np.ndarray, score) -> np.ndarray:
    """Grad-CAM of one image's feature map a (C, h, w) for a scalar score(a), by definition."""
    a = a.astype(np.float64)
    grads = np.zeros_like(a)
    eps = 1e-3
    for index in np.ndindex(*a.shape):
        up, down = a.copy(), a.copy()
        up[index] += eps
        down[index] -= eps
        grads[index] = (score(up) - score(down)) / (2 * eps)
    alpha = grads.mean(axis=(1, 2))
    return np.maximum((alpha[:, None, None] * a).sum(axis=0), 0.0)


def _head(p: dict, x_axis_mean) -> callable:
    w, b = p["fc_w"].astype(np.float64), p["fc_b"].astype(np.float64)
    return lambda a: x_axis_mean(a) @ w.T + b


@pytest.mark.parametrize(
    "classes, head, opset",
    [(2, "logits", 17), (2, "softmax", 17), (1, "sigmoid", 17), (3, "softmax", 17), (2, "logits", 11), (3, "softmax", 11)],
)  # opset 11: the MatMul form (no Einsum before opset 12)
def test_nchw_heatmap_equals_gradcam_by_definition_and_output_0_is_unchanged(tmp_path: Path, classes: int, head: str, opset: int) -> None:
    path = cnn(tmp_path / "m.onnx", size=(16, 16), channels=3, classes=classes, head=head, seed=classes, opset=opset)
    spec = PreprocessSpec(height=16, width=16, color="rgb", layout="NCHW")
    labels = LABELS3 if classes == 3 else LABELS2
    original = onnx.load(str(path))
    explained, record = add_heatmap_outputs(original, spec, labels)
    assert record["heatmap_output"] == "pneumoedge_heatmap" and record["features_output"] == "pneumoedge_features"
    assert record["layer"] == "features" and record["method"] == "closed-form Grad-CAM (GAP + linear head)"
    x = np.random.default_rng(5).normal(size=(4, 3, 16, 16)).astype(np.float32)
    out0, heat, feats = _session(explained).run(None, {"input": x})
    a = _session(_with_output(original, "features")).run(["features"], {"input": x})[0]  # (N, C, 8, 8)
    assert heat.shape == (4, 8, 8) and feats.shape == (4, 8)
    np.testing.assert_allclose(feats, a.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    logits = _head(weights(3, 8, classes, classes), lambda t: t.mean(axis=(1, 2)))
    for n in range(len(x)):
        if classes == 1:
            score = lambda t: logits(t)[0]
        elif classes == 2:
            score = lambda t: logits(t)[1] - logits(t)[0]  # log-odds of PNEUMONIA
        else:
            k = int(np.argmax(out0[n]))
            score = lambda t, k=k: logits(t)[k]
        expected = gradcam_by_finite_differences(a[n], score)
        np.testing.assert_allclose(heat[n], expected, rtol=1e-4, atol=1e-6)
    assert (heat > 0).any() and (heat == 0).any()  # a real map, ReLU'd
    ops = {n.op_type for n in explained.graph.node[len(original.graph.node):]}
    assert ("Einsum" in ops) == (opset >= 12) and ("MatMul" in ops) == (opset < 12)
    for runtime in (False, True):  # plain options and the runtime's (full optimisation)
        plain = _session(original, runtime=runtime).run(None, {"input": x})[0]
        grown = _session(explained, runtime=runtime).run(None, {"input": x})[0]
        assert np.array_equal(plain, grown)


def test_nhwc_reduce_mean_head_gets_the_same_closed_form(tmp_path: Path) -> None:
    path = cnn(tmp_path / "k.onnx", size=(12, 12), channels=1, layout="NHWC", classes=1, head="sigmoid", seed=4)
    spec = PreprocessSpec(height=12, width=12, color="gray")
    original = onnx.load(str(path))
    explained, record = add_heatmap_outputs(original, spec, LABELS2)
    assert record["layer"] == "features"  # the NCHW map before tf2onnx's Transpose -> ReduceMean
    x = np.random.default_rng(2).random((3, 12, 12, 1), dtype=np.float32)
    heat, feats = _session(explained).run(["pneumoedge_heatmap", "pneumoedge_features"], {"input": x})
    a = _session(_with_output(original, "features_nhwc")).run(["features_nhwc"], {"input": x})[0]  # (N, h, w, C)
    np.testing.assert_allclose(feats, a.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    logits = _head(weights(1, 8, 1, 4), lambda t: t.mean(axis=(1, 2)))
    for n in range(len(x)):
        expected = gradcam_by_finite_differences(a[n].transpose(2, 0, 1), lambda t: logits(t)[0])
        np.testing.assert_allclose(heat[n], expected, rtol=1e-4, atol=1e-6)


def test_a_channels_last_map_without_a_transpose(tmp_path: Path) -> None:
    """input (N, H, W, C) -> Relu (A, NHWC) -> ReduceMean [1, 2] -> MatMul -> Add -> output (N, 2)"""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    w, b = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["a"]), helper.make_node("ReduceMean", ["a"], ["pooled"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])],
        "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, 5, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    explained, record = add_heatmap_outputs(model, PreprocessSpec(height=6, width=5, color="rgb"), LABELS2)
    assert record["layout"] == "NHWC" and record["map_size"] == [6, 5]
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    out0, heat, feats = _session(explained).run(None, {"input": x})
    a = np.maximum(x, 0).astype(np.float64)
    np.testing.assert_allclose(feats, a.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    for n in range(2):
        score = lambda t: (t.mean(axis=(1, 2)) @ w + b) @ np.array([-1.0, 1.0])
        np.testing.assert_allclose(heat[n], gradcam_by_finite_differences(a[n].transpose(2, 0, 1), score), rtol=1e-4, atol=1e-6)
    assert np.array_equal(out0, _session(model).run(None, {"input": x})[0])


def test_wrapping_keeps_heatmaps_for_both_layouts_with_output_0_bit_for_bit(tmp_path: Path) -> None:
    for layout, channels in (("NCHW", 3), ("NHWC", 1)):
        path = cnn(tmp_path / f"{layout}.onnx", size=(150, 150), channels=channels, layout=layout, classes=1, head="sigmoid")
        spec = PreprocessSpec(height=150, width=150, color="rgb" if channels == 3 else "gray", layout=layout)
        result = wrap_onnx(path, tmp_path / f"{layout}.w.onnx", spec=spec, labels=LABELS2, head="sigmoid")
        assert result.equality["identical"] and result.equality["graph_unchanged"], layout
        assert result.explain is not None, result.heatmap_note
        names = [o.name for o in onnx.load(str(result.onnx_path)).graph.output]
        assert names == ["probs", "pneumoedge_heatmap", "pneumoedge_features"]


def test_heatmaps_are_left_out_when_they_would_change_output_0(tmp_path: Path, monkeypatch) -> None:
    """onnxruntime may optimise a graph differently once a tensor has a second consumer; if that
    ever moved output 0 by a bit, the wrapper keeps the original graph and says so."""
    import pneumoedge.export.onnx_wrap as onnx_wrap

    def nudging(model, spec, labels):
        grown, record = add_heatmap_outputs(model, spec, labels)
        last = next(n for n in grown.graph.node if "logits" in n.output)
        last.output[0] = "logits_before"
        grown.graph.node.append(onnx.helper.make_node("Mul", ["logits_before", "nudge"], ["logits"], name="pneumoedge_cam_nudge"))
        grown.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0001, np.float32), "pneumoedge_cam_nudge_value"))
        grown.graph.node[-1].input[1] = "pneumoedge_cam_nudge_value"
        return grown, record

    monkeypatch.setattr(onnx_wrap, "add_heatmap_outputs", nudging)
    path = cnn(tmp_path / "m.onnx", size=(32, 32), channels=3)
    result = wrap_onnx(path, tmp_path / "w.onnx", spec=PreprocessSpec(height=32, width=32, color="rgb", layout="NCHW"),
                       labels=LABELS2, head="logits")
    assert result.explain is None and "left out" in result.heatmap_note
    assert result.equality["identical"] and result.equality["graph_unchanged"]
    assert [o.name for o in onnx.load(str(result.onnx_path)).graph.output] == ["logits"]


def test_other_heads_say_heatmaps_are_not_available_and_still_wrap(tmp_path: Path) -> None:
    path = cnn(tmp_path / "flat.onnx", size=(16, 16), channels=3, pool="flatten")
    spec = PreprocessSpec(height=16, width=16, color="rgb", layout="NCHW")
    with pytest.raises(HeatmapUnavailable, match=r"head is not global-average-pool \+ linear"):
        add_heatmap_outputs(onnx.load(str(path)), spec, LABELS2)
    result = wrap_onnx(path, tmp_path / "flat.w.onnx", spec=spec, labels=LABELS2, head="logits")
    assert result.explain is None and result.heatmap_note.startswith(NOT_AVAILABLE)
    assert result.card.explain is None and result.equality["identical"]


def test_fixed_batch_graph_gets_a_fixed_batch_heatmap(tmp_path: Path) -> None:
    path = cnn(tmp_path / "b1.onnx", size=(16, 16), channels=1, batch=1)
    spec = PreprocessSpec(height=16, width=16, color="gray", layout="NCHW")
    explained, _ = add_heatmap_outputs(onnx.load(str(path)), spec, LABELS2)
    heat = explained.graph.output[1]
    assert [d.dim_value for d in heat.type.tensor_type.shape.dim] == [1, 8, 8]
    assert _session(explained).run(["pneumoedge_heatmap"], {"input": np.ones((1, 1, 16, 16), np.float32)})[0].shape == (1, 8, 8)
