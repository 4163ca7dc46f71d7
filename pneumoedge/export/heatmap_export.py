"""The heatmap side of an export: output renaming, running and checking the Grad-CAM outputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.export.errors import ExportError
from pneumoedge.export.gradcam import (
    DEFAULT_MIN_CORRELATION,
    HEATMAP_OUTPUT,
    ExplainedModel,
    HeatmapReport,
    HeatmapUnavailable,
    compare_maps,
    explain_model,
    gradcam_reference,
)
from pneumoedge.export.keras_loading import KerasModel

log = logging.getLogger(__name__)


def _session(path: Union[str, Path]) -> Any:
    # onnx_export imports this module, so its session helper is looked up at call time.
    from pneumoedge.export.onnx_export import onnx_session

    return onnx_session(path)


def _rename_output(proto: Any, old: str, new: str) -> None:
    for node in proto.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in proto.graph.output:
        if output.name == old:
            output.name = new


def run_heatmaps(session: Any, tensors: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The `pneumoedge_heatmap` output of a session over (N, ...) tensors: (N, h, w)."""
    from pneumoedge.export.onnx_export import run_output  # onnx_export imports this module

    return run_output(session, tensors, HEATMAP_OUTPUT, batch_size)


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
    maps = run_heatmaps(_session(onnx_path), tensors)
    return compare_maps(maps, reference, explained.layer, threshold)


def int8_heatmap_check(
    fp32_path: Union[str, Path], int8_path: Union[str, Path], tensors: np.ndarray, *, threshold: float = DEFAULT_MIN_CORRELATION
) -> dict[str, Any]:
    """An int8 member's heatmaps against its fp32 graph's: the card entry's "int8_check".

    When they do not correlate well enough, the runtime asks the fp32 graph for the map.
    """
    layer = "int8 vs fp32"
    report = compare_maps(run_heatmaps(_session(int8_path), tensors), run_heatmaps(_session(fp32_path), tensors), layer, threshold)
    return {
        "min_correlation": round(report.min_correlation, 6),
        "mean_correlation": round(report.mean_correlation, 6),
        "images": report.images,
        "threshold": threshold,
        "heatmap_from": "int8" if report.ok else "fp32",
    }


def _explained(model: KerasModel, labels: Sequence[str], layer: Optional[str]) -> tuple[Optional[ExplainedModel], str]:
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
