"""Keras -> ONNX with tf2onnx, the model card in metadata_props, and a parity check on real images.

Sessions and runs are in `onnx_run`, images and tensors in `tensors`, heads and cards in
`heads`, the heatmap outputs' checks in `heatmap_export`.

Opset 17 on purpose: it is the newest opset tf2onnx 1.16/1.17 converts and tests fully, it is
far above the 13 that per-channel QDQ int8 needs (QuantizeLinear with `axis`), and every
onnxruntime (and onnxruntime-gpu) since 1.13 runs it, so a clinic that pinned an older
runtime still loads our files. Newer opsets bring nothing these CNNs use.

Keras 3 models are converted with `tf2onnx.convert.from_function` over
`model(x, training=False)` (`from_keras` fails on Keras 3), with a batch axis of None, so the
runtime may batch freely. The traced function is frozen first (`_traced`): every captured tensor,
not only variables, becomes a constant, so the graph has exactly one input.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import FEATURES_OUTPUT, HEATMAP_OUTPUT, ONNX_METADATA_KEY, ModelCard, apply_activation
from pneumoedge.export.errors import ExportError, ParityError
from pneumoedge.export.gradcam import DEFAULT_MIN_CORRELATION, ExplainedModel, HeatmapReport, score_description
from pneumoedge.export.heads import card_for, check_probabilities
from pneumoedge.export.heatmap_export import check_heatmaps, explained_or_note, rename_output
from pneumoedge.export.keras_loading import KerasModel, check_spec_matches, load_keras
from pneumoedge.export.onnx_run import onnx_session, run_onnx
from pneumoedge.export.tensors import reference_tensors
from pneumoedge.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Largest |p_keras - p_onnx| accepted, on probabilities (after the declared activation).
#: A conversion error moves probabilities by 1e-2 or more; float32 rounding through a deep
#: network (an EfficientNetB0 with real batch-norm statistics: 9.4e-5) comes close to 1e-4, so
#: 1e-4 would refuse sound exports of real models for rounding, and 1e-3 is still far below
#: any difference that could change a label.
DEFAULT_PARITY_TOLERANCE = 1e-3


@dataclass
class ParityReport:
    """Keras vs onnxruntime on the same preprocessed images, compared as probabilities."""

    max_abs_diff: float
    mean_abs_diff: float
    images: int
    tolerance: float
    source: str
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


@dataclass
class ExportResult:
    onnx_path: Path
    card: ModelCard
    parity: ParityReport
    size_bytes: int
    seconds: float
    nodes: int
    #: ONNX heatmaps vs TensorFlow's Grad-CAM; None when the graph carries no heatmaps.
    heatmap: Optional[HeatmapReport] = None
    #: Why the graph carries no heatmaps ("" when it does).
    heatmap_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_path": str(self.onnx_path),
            "card": self.card.to_dict(),
            "parity": self.parity.to_dict(),
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "nodes": self.nodes,
            "heatmap": self.heatmap.to_dict() if self.heatmap else None,
            "heatmap_note": self.heatmap_note,
        }


# ---------------------------------------------------------------------------------------------
# conversion and parity


def convert(
    model: KerasModel,
    spec: PreprocessSpec,
    out_path: Union[str, Path],
    card: ModelCard,
    *,
    opset: int = DEFAULT_OPSET,
    explained: Optional[ExplainedModel] = None,
) -> Path:
    """Convert to ONNX (dynamic batch, input named "input"), storing `card` in metadata_props.

    With `explained`, the graph has two more outputs after the class output: the heatmap
    (`pneumoedge_heatmap`, N x h x w) and the pooled features (`pneumoedge_features`, N x C).
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    signature = (tf.TensorSpec((None, *spec.input_shape), tf.float32, name="input"),)
    function, captured = _traced(explained.call if explained is not None else model.call, signature, model.description)
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    except Exception as exc:  # tf2onnx raises many kinds of errors for unsupported graphs
        raise ExportError(f"tf2onnx could not convert {model.description}: {type(exc).__name__}: {exc}") from None
    folded = _fold_captured_inputs(proto, captured)
    if folded:
        log.info("%s: captured tensors %s stored as constants", model.description, ", ".join(folded))
    _check_single_input(proto, model.description)
    expected = 3 if explained is not None else 1
    if len(proto.graph.output) != expected:
        raise ExportError(f"the converted model has {len(proto.graph.output)} outputs; expected {expected}")
    if explained is not None:
        rename_output(proto, proto.graph.output[1].name, HEATMAP_OUTPUT)
        rename_output(proto, proto.graph.output[2].name, FEATURES_OUTPUT)
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(card.to_dict())})
    proto.doc_string = f"pneumoedge export of {model.description}; labels {', '.join(card.labels)}"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # e.g. a TensorFlow op tf2onnx left unconverted
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{model.description}: the converted graph is not valid ONNX: {reason}") from None
    onnx.save(proto, str(out))
    return out


def _traced(call: Any, signature: tuple, description: str) -> tuple[Any, dict[str, np.ndarray]]:
    """`call` as a tf.function for tf2onnx, frozen where TensorFlow can, and its captured tensors' values.

    Why not leave freezing to tf2onnx: it folds captured *variables*, but takes every other captured
    tensor for a graph input. Keras 3 keeps some layer state as plain eager tensors (Normalization's
    mean and variance, in every keras.applications EfficientNet), which tf.function captures; the
    ONNX graph then wants them fed at run time. `convert_variables_to_constants_v2` folds both kinds.
    Where it fails (a SavedModel whose random-augmentation layers assign seed variables), tf2onnx's
    own fallback converts and `_fold_captured_inputs` turns the leftover inputs into initializers.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    function = tf.function(call)
    try:
        concrete = function.get_concrete_function(*signature)
    except ExportError:
        raise
    except Exception as exc:  # tracing fails in many ways on unusual models
        raise ExportError(f"cannot trace {description} for conversion: {type(exc).__name__}: {exc}") from None
    captured = {}
    for external, internal in concrete.graph.captures:
        if external.dtype != tf.resource and hasattr(external, "numpy"):
            captured[internal.name] = np.asarray(external.numpy())
    try:
        frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    except Exception as exc:  # noqa: BLE001 (tf2onnx retries with its own repairs)
        log.info("freezing %s failed (%s: %s); leaving it to tf2onnx", description, type(exc).__name__, exc)
        return function, captured
    return tf.function(lambda x: frozen(x)), captured


def _fold_captured_inputs(proto: Any, captured: dict[str, np.ndarray]) -> list[str]:
    """Turn graph inputs that are captured tensors into initializers holding their values."""
    from onnx import numpy_helper

    folded = [i for i in proto.graph.input if i.name != "input" and i.name in captured]
    for graph_input in folded:
        proto.graph.initializer.append(numpy_helper.from_array(captured[graph_input.name], graph_input.name))
        proto.graph.input.remove(graph_input)
    return [i.name for i in folded]


def _check_single_input(proto: Any, description: str) -> None:
    """Refuse a graph that wants more than the image: the runtime feeds only "input"."""
    initializers = {init.name for init in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    if names != ["input"]:
        extra = ", ".join(repr(n) for n in names if n != "input") or "none named 'input'"
        raise ExportError(f"{description}: the converted ONNX graph has inputs {names}, expected only 'input' (extra: {extra})")


def check_parity(
    model: KerasModel,
    onnx_path: Union[str, Path],
    tensors: np.ndarray,
    activation: str,
    *,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
    source: str = "",
) -> ParityReport:
    """Compare Keras and onnxruntime probabilities on `tensors`, at batch 1 and a larger batch."""
    keras_probs = apply_activation(model.predict(tensors), activation)
    session = onnx_session(onnx_path)
    onnx_batched = apply_activation(run_onnx(session, tensors, batch_size=16), activation)
    onnx_single = apply_activation(run_onnx(session, tensors[:4], batch_size=1), activation)
    diffs = np.abs(keras_probs - onnx_batched)
    max_diff = float(max(diffs.max(), np.abs(keras_probs[:4] - onnx_single).max()))
    return ParityReport(
        max_abs_diff=max_diff,
        mean_abs_diff=float(diffs.mean()),
        images=len(tensors),
        tolerance=float(tolerance),
        source=source,
        batch_sizes=[1, min(16, len(tensors))],
    )


def export_keras(
    source: Union[str, Path, Any],
    out_path: Union[str, Path],
    *,
    spec: PreprocessSpec,
    labels: Sequence[str],
    head: str = "sigmoid",
    images: Optional[Union[str, Path]] = None,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    parity_count: int = 32,
    heatmaps: bool = True,
    heatmap_layer: Optional[str] = None,
    heatmap_correlation: float = DEFAULT_MIN_CORRELATION,
) -> ExportResult:
    """Export one Keras model to ONNX and prove parity on real preprocessed images.

    Args:
        source: a `.keras`/`.h5` file, a SavedModel folder, a pneumoedge run folder, or a model.
        out_path: the `.onnx` file to write.
        spec: the preprocessing the model was trained with (ours: the run's spec.json).
        labels: label names; labels[1] is what a 1-unit binary head gives the probability of.
        head: "sigmoid" | "softmax" (probabilities) or "logits" (the runtime applies the activation).
        images: folder of images for the parity check; generated phantoms when None.
        tolerance: the largest accepted |p_keras - p_onnx|; beyond it `ParityError` is raised
            and the ONNX file is removed.
        heatmaps: add Grad-CAM heatmap and pooled-feature outputs (`pneumoedge.export.gradcam`)
            when the model's structure allows; otherwise say why and export the classifier.
        heatmap_layer: the feature layer by name (default: the last 4-D activation).
        heatmap_correlation: the smallest accepted per-image Pearson correlation between the
            ONNX heatmaps and TensorFlow's Grad-CAM; below it `ParityError` is raised.

    Returns:
        ExportResult with the parity report (and the heatmap check).
    """
    started = time.perf_counter()
    model = load_keras(source)
    check_spec_matches(model, spec)
    tensors, described = reference_tensors(spec, images, count=parity_count)
    raw = model.predict(tensors[:8])
    card = card_for(spec, labels, head, raw.shape[1])
    check_probabilities(raw, head)
    explained, note = None, "heatmaps not asked for"
    if heatmaps or heatmap_layer:
        explained, note = explained_or_note(model, labels, heatmap_layer)
    if explained is not None:
        card = replace(card, explain=explained.card_entry(score_description(labels, raw.shape[1])))
    out = convert(model, spec, out_path, card, opset=opset, explained=explained)
    parity = check_parity(model, out, tensors, card.activation, tolerance=tolerance, source=described)
    log.info("parity on %s: max |p_keras - p_onnx| = %.3g", described, parity.max_abs_diff)
    if not parity.ok:
        out.unlink(missing_ok=True)
        raise ParityError(
            f"{model.description}: ONNX output differs from Keras by up to {parity.max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}) on {described}; the ONNX file was not kept"
        )
    report = None
    if explained is not None:
        report = check_heatmaps(explained, out, tensors, len(labels), threshold=heatmap_correlation)
        log.info("heatmaps at %s: min Pearson r vs TensorFlow Grad-CAM = %.6f", report.layer, report.min_correlation)
        if not report.ok:
            out.unlink(missing_ok=True)
            raise ParityError(
                f"{model.description}: ONNX heatmaps at {report.layer} correlate with TensorFlow's Grad-CAM only "
                f"r = {report.min_correlation:.4f} on one image (need {heatmap_correlation}); the ONNX file was not kept"
            )
        note = ""
    import onnx

    nodes = len(onnx.load(str(out)).graph.node)
    return ExportResult(out, card, parity, out.stat().st_size, time.perf_counter() - started, nodes, report, note)
