"""Evaluating a run (Keras) or a bundle / ONNX model (the runtime) on a labelled folder.

The metrics and the threshold policy are in `metrics`, the plots in `metric_plots`; their names
stay importable from here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.export.errors import ExportError
from pneumoedge.export.metric_plots import plot_confusion, plot_history, plot_roc, write_report
from pneumoedge.export.metrics import (
    DEFAULT_THRESHOLD_METHOD,
    choose_threshold,
    classification_metrics,
    confusion_matrix,
    roc_auc,
    roc_curve,
)

__all__ = [
    "DEFAULT_THRESHOLD_METHOD", "choose_threshold", "classification_metrics", "confusion_matrix", "evaluate_model",
    "evaluate_run", "labelled_samples", "plot_confusion", "plot_history", "plot_roc", "roc_auc", "roc_curve", "write_report",
]

log = logging.getLogger(__name__)


def labelled_samples(data_dir: Union[str, Path], task: str = "binary") -> tuple[list[Any], str]:
    """Samples of a Kaggle-layout folder for evaluation, and which split was used.

    `data_dir` may be a data set root (its test/ split is used when present, else every split)
    or one split folder holding NORMAL/ and PNEUMONIA/.
    """
    from pneumoedge.datasets import kaggle

    root = Path(data_dir)
    try:
        if any((root / label).is_dir() for label in kaggle.BINARY_LABELS):
            if root.name in kaggle.SPLITS:
                return kaggle.scan(root.parent, split=root.name), root.name
            samples = []  # a labelled folder with another name (holdout/NORMAL, ...)
            for label, folder in kaggle.label_dirs(root).items():
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in kaggle.SUFFIXES:
                        samples.append(kaggle.Sample(path, label, kaggle.subtype_of(path.name, label), kaggle.patient_id(path.name), root.name))
            if not samples:
                raise ExportError(f"{root}: no images in NORMAL/ or PNEUMONIA/")
            return samples, root.name
        if (root / "test").is_dir():
            return kaggle.scan(root, split="test"), "test"
        return kaggle.scan(root), "all splits"
    except kaggle.DatasetError as exc:
        raise ExportError(str(exc)) from None


def _targets(samples: Sequence[Any], task: str, labels: Sequence[str]) -> np.ndarray:
    from pneumoedge.datasets import kaggle

    try:
        return np.array([list(labels).index(s.target(task)) for s in samples], dtype=int)
    except (kaggle.DatasetError, ValueError) as exc:
        raise ExportError(f"labels of the data do not match the model's {list(labels)}: {exc}") from None


def evaluate_run(
    run_dir: Union[str, Path], data_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, *, threshold: Optional[float] = None
) -> dict[str, Any]:
    """Evaluate a run's Keras model on a labelled folder through `preprocess` (needs TensorFlow)."""
    import keras

    from pneumoedge.export.onnx_export import load_tensors
    from pneumoedge.export.training import read_run

    run = read_run(run_dir)
    samples, split = labelled_samples(data_dir, run.task)
    y = _targets(samples, run.task, run.labels)
    model = keras.saving.load_model(run.run_dir / "model.keras", compile=False)
    x = load_tensors([s.path for s in samples], run.spec)
    probs = model.predict(x, batch_size=32, verbose=0)
    threshold = run.threshold if threshold is None else threshold
    metrics = classification_metrics(y, probs, run.labels, threshold)
    metrics.update({"model": str(run.run_dir), "engine": "keras", "data": str(data_dir), "split": split})
    out = Path(out_dir) if out_dir else run.run_dir / "evaluation" / Path(data_dir).resolve().name
    metrics["files"] = write_report(out, "evaluation", y, probs, run.labels, metrics)
    return metrics


def evaluate_model(
    model: Union[str, Path, Sequence[Union[str, Path]]],
    data_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    precision: str = "default",
    threshold: Optional[float] = None,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Evaluate a bundle or ONNX model(s) with the runtime (`pneumoedge.load`; no TensorFlow)."""
    import pneumoedge

    ensemble = pneumoedge.load(model, precision=precision, threads=threads)
    labels = list(ensemble.labels)
    task = "binary" if len(labels) == 2 else "multiclass"
    samples, split = labelled_samples(data_dir, task)
    predictions = list(ensemble.predict_many([s.path for s in samples], batch_size=16))
    ok = [(s, p) for s, p in zip(samples, predictions) if p.status == "ok"]
    failed = [{"path": str(s.path), "error": p.error} for s, p in zip(samples, predictions) if p.status != "ok"]
    if not ok:
        raise ExportError(f"no image of {data_dir} could be predicted ({len(failed)} failures)")
    first = ok[0][1]
    y = _targets([s for s, _ in ok], task, labels)
    probs = np.array([[p.probabilities[label] for label in labels] for _, p in ok], dtype=np.float64)
    threshold = first.threshold if threshold is None else threshold
    metrics = classification_metrics(y, probs, labels, threshold)
    metrics.update({
        "model": str(model), "engine": "onnxruntime (pneumoedge.load)", "precision": precision,
        "data": str(data_dir), "split": split, "failed": failed,
    })
    metrics["files"] = write_report(out_dir, "evaluation", y, probs, labels, metrics)
    return metrics
