"""The heatmap side of an export: output renaming, running and checking the Grad-CAM outputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.export.errors import ExportError, HeatmapUnavailable
from pneumoedge.export.gradcam import (
    DEFAULT_MIN_CORRELATION,
    ExplainedModel,
    HeatmapReport,
    compare_maps,
    explain_model,
    gradcam_reference,
)
from pneumoedge.export.keras_loading import KerasModel
from pneumoedge.export.onnx_run import onnx_session, run_heatmaps

log = logging.getLogger(__name__)


def rename_output(proto: Any, old: str, new: str) -> None:
    """Rename a graph output (and every use of it) in place."""
    for node in proto.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in proto.graph.output:
        if output.name == old:
            output.name = new


def check_heatmaps(
    explained: ExplainedModel,
    onnx_path: Union[str, Path],
    tensors: np.ndarray,
    labels: int,
    *,
    threshold: float = DEFAULT_MIN_CORRELATION,
) -> HeatmapReport:
    """Per-image Pearson correlation of the ONNX heatmaps with TensorFlow's GradientTape Grad-CAM."""
    reference = gradcam_reference(explained, tensors, labels)
    maps = run_heatmaps(onnx_session(onnx_path), tensors)
    return compare_maps(maps, reference, explained.layer, threshold)


def int8_heatmap_check(
    fp32_path: Union[str, Path], int8_path: Union[str, Path], tensors: np.ndarray, *, threshold: float = DEFAULT_MIN_CORRELATION
) -> dict[str, Any]:
    """An int8 member's heatmaps against its fp32 graph's: the card entry's "int8_check".

    When they do not correlate well enough, the runtime asks the fp32 graph for the map.
    """
    layer = "int8 vs fp32"
    maps = run_heatmaps(onnx_session(int8_path), tensors)
    report = compare_maps(maps, run_heatmaps(onnx_session(fp32_path), tensors), layer, threshold)
    return {
        "min_correlation": round(report.min_correlation, 6),
        "mean_correlation": round(report.mean_correlation, 6),
        "images": report.images,
        "threshold": threshold,
        "heatmap_from": "int8" if report.ok else "fp32",
    }


def explained_or_note(model: KerasModel, labels: Sequence[str], layer: Optional[str]) -> tuple[Optional[ExplainedModel], str]:
    """The model split for heatmaps, or None and the reason (a named layer that fails is an error)."""
    if model.keras_model is None:
        note = "heatmaps not available: a SavedModel has no Keras layers to find the feature layer in"
        if layer:
            raise ExportError(f"--heatmap-layer {layer}: {note}")
        log.warning("%s", note)
        return None, note
    try:
        return explain_model(model.keras_model, len(labels), layer), ""
    except HeatmapUnavailable as exc:
        if layer:
            raise ExportError(f"--heatmap-layer {layer}: {exc}") from None
        note = f"heatmaps not available: {exc}"
        log.warning("%s: %s", model.description, note)
        return None, note
