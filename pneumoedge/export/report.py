"""What an export says: progress lines, the notice of synthetic data, slim metrics, report JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Union

from pneumoedge.atomic import write_atomic

SYNTHETIC_NOTICE = "synthetic phantoms; demonstration only; NOT clinically validated; not for diagnosis"
Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A progress callback that says nothing."""


def report_export(result: Any, progress: Progress) -> None:
    """The lines that follow a Keras export: parity, and the heatmap check or why there is none."""
    progress(f"  parity max |p_keras - p_onnx| = {result.parity.max_abs_diff:.2e} on {result.parity.source}")
    if result.heatmap is not None:
        progress(f"  heatmaps at {result.heatmap.layer}: min Pearson r vs TensorFlow Grad-CAM {result.heatmap.min_correlation:.6f}")
    elif result.heatmap_note:
        progress(f"  {result.heatmap_note}")


def slim(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the bulky parts, for the manifest."""
    keep = ("images", "accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "macro_f1", "confusion_matrix", "max_prob_diff", "agreement")
    return {k: ({kk: vv for kk, vv in v.items() if kk in keep} if isinstance(v, dict) else v) for k, v in metrics.items()}


def write_report_json(path: Union[str, Path], data: dict[str, Any]) -> Path:
    """Write a report as indented JSON (values JSON cannot hold are written as text)."""
    return write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
