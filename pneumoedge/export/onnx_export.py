"""Keras -> ONNX with tf2onnx, the model card in metadata_props, and a parity check on real images.

Opset 17 on purpose: it is the newest opset tf2onnx 1.16/1.17 converts and tests fully, it is
far above the 13 that per-channel QDQ int8 needs (QuantizeLinear with `axis`), and every
onnxruntime (and onnxruntime-gpu) since 1.13 runs it, so a clinic that pinned an older
runtime still loads our files. Newer opsets bring nothing these CNNs use.

Keras 3 models are converted with `tf2onnx.convert.from_function` over
`model(x, training=False)` (`from_keras` fails on Keras 3), with a batch axis of None, so the
runtime may batch freely.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import ONNX_METADATA_KEY, ModelCard
from pneumoedge.export.errors import ExportError, ParityError
from pneumoedge.export.gradcam import (
    DEFAULT_MIN_CORRELATION,
    FEATURES_OUTPUT,
    HEATMAP_OUTPUT,
    ExplainedModel,
    HeatmapReport,
    score_description,
)
from pneumoedge.export.heatmap_export import _explained, _rename_output, check_heatmaps, int8_heatmap_check, run_heatmaps
from pneumoedge.export.keras_loading import KerasModel, _check_spec_matches, load_keras
from pneumoedge.imageio import IMAGE_SUFFIXES, ImageError
from pneumoedge.preprocessing import PreprocessSpec, preprocess

# Public names; the heatmap and Keras-loading ones live in heatmap_export and keras_loading.
__all__ = [
    "DEFAULT_OPSET", "DEFAULT_PARITY_TOLERANCE", "ExportResult", "HEADS", "KerasModel", "ParityReport",
    "apply_activation", "card_for", "check_heatmaps", "check_parity", "class_probabilities", "convert",
    "export_keras", "image_files", "int8_heatmap_check", "load_keras", "load_tensors", "onnx_session",
    "parse_floats", "parse_scale", "phantom_folder", "reference_tensors", "run_heatmaps", "run_onnx",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Largest |p_keras - p_onnx| accepted, on probabilities (after the declared activation).
DEFAULT_PARITY_TOLERANCE = 1e-4
#: How a model's last layer reads: probabilities from one sigmoid unit, N softmax units, or raw
#: logits to which the runtime applies sigmoid (1 unit) or softmax (N units).
HEADS = ("sigmoid", "softmax", "logits")


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
# numpy helpers shared with evaluation and quantization


def apply_activation(raw: np.ndarray, activation: str) -> np.ndarray:
    """Turn a model's raw output (N, K) into probabilities, as the runtime does."""
    raw = np.asarray(raw, dtype=np.float64)
    if activation == "none":
        return raw
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-raw))
    if activation == "softmax":
        shifted = raw - raw.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)
    raise ExportError(f"unknown activation {activation!r}")


def class_probabilities(probs: np.ndarray) -> np.ndarray:
    """(N, 1) probability of labels[1] -> (N, 2); (N, K) stays."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.shape[1] == 1:
        return np.concatenate([1.0 - probs, probs], axis=1)
    return probs


def onnx_session(path: Union[str, Path], threads: int = 1) -> Any:
    """A plain CPU onnxruntime session for checks (the runtime has its own session factory)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_output(session: Any, tensors: np.ndarray, output: Optional[str] = None, batch_size: int = 16) -> np.ndarray:
    """One output (default: the first) of a one-input session over (N, ...) tensors, in batches."""
    name = session.get_inputs()[0].name
    output = output or session.get_outputs()[0].name
    outputs = []
    for start in range(0, len(tensors), batch_size):
        batch = np.ascontiguousarray(tensors[start : start + batch_size], dtype=np.float32)
        outputs.append(session.run([output], {name: batch})[0])
    return np.concatenate(outputs, axis=0)


def run_onnx(session: Any, tensors: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Raw class output (the first) of a session over (N, ...) tensors, as (N, K)."""
    return run_output(session, tensors, batch_size=batch_size).reshape(len(tensors), -1)


# ---------------------------------------------------------------------------------------------
# images for parity and calibration


def image_files(folder: Union[str, Path], limit: Optional[int] = None) -> list[Path]:
    """Image files under `folder` (recursive, sorted); `limit` picks evenly across the list."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"{root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ExportError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    if limit is not None and len(files) > limit:
        picks = np.linspace(0, len(files) - 1, limit).round().astype(int)
        files = [files[i] for i in sorted(set(picks.tolist()))]
    return files


def load_tensors(files: Iterable[Union[str, Path]], spec: PreprocessSpec) -> np.ndarray:
    """Stack `preprocess(file, spec)` for each file: (N, *spec.input_shape) float32."""
    tensors = []
    for path in files:
        try:
            tensors.append(preprocess(path, spec))
        except ImageError as exc:
            raise ExportError(f"{path}: {exc}") from None
    if not tensors:
        raise ExportError("no images to preprocess")
    return np.stack(tensors).astype(np.float32, copy=False)


def phantom_folder(root: Union[str, Path], *, count: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Generate a small set of labelled synthetic phantoms (Kaggle layout) under `root`."""
    from pneumoedge.datasets import phantoms

    normal = max(1, count // 2)
    bacteria = max(1, (count - normal) // 2)
    phantoms.generate_dataset(
        root,
        counts={"train": {"normal": normal, "bacteria": bacteria, "virus": max(1, count - normal - bacteria)}},
        size=size,
        seed=seed,
        sixteen_bit_fraction=0.2,
    )
    return Path(root)


def reference_tensors(
    spec: PreprocessSpec, images: Optional[Union[str, Path]] = None, *, count: int = 32, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Real preprocessed images for parity: from `images` (a folder) or generated phantoms."""
    if images is not None:
        files = image_files(images, limit=count)
        return load_tensors(files, spec), f"{len(files)} images from {images}"
    with tempfile.TemporaryDirectory(prefix="pneumoedge-parity-") as tmp:
        folder = phantom_folder(tmp, count=count, size=max(spec.height, spec.width, 64), seed=seed)
        files = image_files(folder, limit=count)
        return load_tensors(files, spec), f"{len(files)} generated phantom images (no folder given)"


# ---------------------------------------------------------------------------------------------
# heads and cards


def card_for(
    spec: PreprocessSpec, labels: Sequence[str], head: str, outputs: int
) -> ModelCard:
    """The `ModelCard` for a model whose last layer is `head` with `outputs` units."""
    labels = tuple(labels)
    if head not in HEADS:
        raise ExportError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    task = "binary" if len(labels) == 2 else "multiclass"
    if outputs == 1:
        if task != "binary":
            raise ExportError(f"the model has 1 output unit but {len(labels)} labels were declared; a 1-unit head is binary")
        if head == "softmax":
            raise ExportError("the model has 1 output unit: a softmax over one unit is always 1; use --head sigmoid (or logits)")
    elif outputs != len(labels):
        raise ExportError(f"the model has {outputs} output units but {len(labels)} labels were declared ({', '.join(labels)})")
    elif head == "sigmoid":
        raise ExportError(f"the model has {outputs} output units: declare --head softmax (probabilities) or logits")
    activation = "none" if head in ("sigmoid", "softmax") else ("sigmoid" if outputs == 1 else "softmax")
    return ModelCard(spec=spec, labels=labels, task=task, activation=activation)


def _check_probabilities(probs: np.ndarray, head: str) -> None:
    if not np.all(np.isfinite(probs)):
        raise ExportError("the model produced NaN or infinite outputs on the reference images")
    if head == "logits":
        return
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ExportError(
            f"--head {head} declares probabilities, but outputs range {probs.min():.3g}..{probs.max():.3g}; "
            "the model seems to output logits: use --head logits"
        )
    if head == "softmax" and probs.shape[1] > 1 and np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise ExportError("--head softmax declares probabilities, but the outputs do not sum to 1: use --head logits")


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
    function = tf.function(explained.call if explained is not None else (lambda x: model.call(x)))
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    except Exception as exc:  # tf2onnx raises many kinds of errors for unsupported graphs
        raise ExportError(f"tf2onnx could not convert {model.description}: {type(exc).__name__}: {exc}") from None
    expected = 3 if explained is not None else 1
    if len(proto.graph.output) != expected:
        raise ExportError(f"the converted model has {len(proto.graph.output)} outputs; expected {expected}")
    if explained is not None:
        _rename_output(proto, proto.graph.output[1].name, HEATMAP_OUTPUT)
        _rename_output(proto, proto.graph.output[2].name, FEATURES_OUTPUT)
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(card.to_dict())})
    proto.doc_string = f"pneumoedge export of {model.description}; labels {', '.join(card.labels)}"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


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
    _check_spec_matches(model, spec)
    tensors, described = reference_tensors(spec, images, count=parity_count)
    raw = model.predict(tensors[:8])
    card = card_for(spec, labels, head, raw.shape[1])
    _check_probabilities(raw, head)
    explained, note = None, "heatmaps not asked for"
    if heatmaps or heatmap_layer:
        explained, note = _explained(model, labels, heatmap_layer)
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


def parse_scale(text: Union[str, float]) -> float:
    """'1/255', '0.0039', 1 -> float; a clear error otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    value = str(text).strip()
    try:
        if "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise ExportError(f"scale must be a number or a fraction like 1/255, got {text!r}") from None


def parse_floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    """'0.485,0.456,0.406' -> a tuple of floats (None stays None)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ExportError(f"{what} must be comma-separated numbers, got {text!r}") from None
