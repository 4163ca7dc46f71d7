"""Evaluating a run (Keras) or a bundle / ONNX model (the runtime) on a labelled folder.

The metrics are the validation room's (`pneumoedge.validation.metrics`), the plots and report
files `metric_plots`'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.datasets.kaggle import labelled_samples, targets
from pneumoedge.export.errors import ExportError
from pneumoedge.export.metric_plots import write_report
from pneumoedge.export.tensors import load_tensors
from pneumoedge.export.training import read_run
from pneumoedge.validation.metrics import classification_metrics

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: Union[str, Path], data_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, *, threshold: Optional[float] = None
) -> dict[str, Any]:
    """Evaluate a run's Keras model on a labelled folder through `preprocess` (needs TensorFlow)."""
    import keras

    run = read_run(run_dir)
    samples, split = labelled_samples(data_dir, run.task)
    y = targets(samples, run.task, run.labels)
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
    y = targets([s for s, _ in ok], task, labels)
    probs = np.array([[p.probabilities[label] for label in labels] for _, p in ok], dtype=np.float64)
    threshold = first.threshold if threshold is None else threshold
    metrics = classification_metrics(y, probs, labels, threshold)
    metrics.update({
        "model": str(model), "engine": "onnxruntime (pneumoedge.load)", "precision": precision,
        "data": str(data_dir), "split": split, "failed": failed,
    })
    metrics["files"] = write_report(out_dir, "evaluation", y, probs, labels, metrics)
    return metrics
