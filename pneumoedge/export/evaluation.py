"""Metrics in numpy (no scikit-learn), the decision threshold chosen on validation data, plots.

Threshold policy (binary): by default the threshold is the HIGHEST one that still reaches a
target sensitivity of 0.95 for PNEUMONIA on the validation split ("sensitivity:0.95"): a missed
pneumonia costs more than a false alarm, so sensitivity is fixed first and specificity is the
best that remains. "youden" (max sensitivity + specificity - 1) and "fixed:0.5" are the other
choices. Multiclass models take the arg-max and have no threshold.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.export.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_METHOD = "sensitivity:0.95"


# ---------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting positive when score >= threshold, thresholds descending."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = np.cumsum(~y)[distinct]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def choose_threshold(y_true: np.ndarray, p_positive: np.ndarray, method: str = DEFAULT_THRESHOLD_METHOD) -> dict[str, Any]:
    """Choose the binary decision threshold on validation data.

    Args:
        y_true: 0/1 with 1 = labels[1] (PNEUMONIA).
        p_positive: probability of labels[1].
        method: "sensitivity:T" (highest threshold with sensitivity >= T), "youden", or "fixed:X".

    Returns:
        {"threshold", "method", "description", "sensitivity", "specificity"} on this data.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p_positive, dtype=np.float64)
    kind, _, value = method.partition(":")
    if kind == "fixed":
        threshold = _float_option(value, method)
    else:
        if y.all() or (~y).all():
            raise ExportError(f"cannot choose a threshold by {method!r}: the validation data has only one class")
        fpr, tpr, thresholds = roc_curve(y, p)
        finite = np.isfinite(thresholds)
        if kind == "youden":
            j = np.where(finite, tpr - fpr, -np.inf)
            threshold = float(thresholds[int(np.argmax(j))])
        elif kind == "sensitivity":
            target = _float_option(value or "0.95", method)
            reaching = np.nonzero(finite & (tpr >= target - 1e-12))[0]
            threshold = float(thresholds[reaching[0]]) if len(reaching) else float(p.min())
        else:
            raise ExportError(f"threshold method must be 'sensitivity:T', 'youden' or 'fixed:X', got {method!r}")
        threshold = float(np.clip(threshold, 0.0, 1.0))
    pred = p >= threshold
    sens = float((pred & y).sum() / max(int(y.sum()), 1))
    spec = float((~pred & ~y).sum() / max(int((~y).sum()), 1))
    names = {"fixed": "fixed", "youden": "Youden J", "sensitivity": f"target sensitivity {value or '0.95'}"}
    description = (
        f"{names[kind]} on validation data ({len(y)} images): "
        f"sensitivity {sens:.3f}, specificity {spec:.3f} at threshold {threshold:.4f}"
    )
    return {"threshold": threshold, "method": method, "description": description, "sensitivity": sens, "specificity": spec}


def _float_option(value: str, method: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ExportError(f"threshold method {method!r}: {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise ExportError(f"threshold method {method!r}: the value must lie in 0..1")
    return number


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], threshold: Optional[float] = None
) -> dict[str, Any]:
    """Confusion matrix, per-class precision/recall/F1, accuracy, ROC AUC.

    Args:
        y_true: class indices into `labels`.
        probs: (N, K) class probabilities, or (N,)/(N, 1) probability of labels[1] for binary.
        threshold: binary decision threshold on p(labels[1]) (default 0.5); ignored for multiclass.
    """
    from pneumoedge.export.onnx_export import class_probabilities

    labels = list(labels)
    y = np.asarray(y_true, dtype=int)
    p = class_probabilities(probs)
    if p.shape[1] != len(labels):
        raise ExportError(f"{p.shape[1]} probability columns for {len(labels)} labels")
    binary = len(labels) == 2
    if binary:
        threshold = 0.5 if threshold is None else float(threshold)
        pred = (p[:, 1] >= threshold).astype(int)
    else:
        pred = p.argmax(axis=1)
    matrix = confusion_matrix(y, pred, len(labels))
    per_class = {}
    for k, name in enumerate(labels):
        tp = int(matrix[k, k])
        predicted = int(matrix[:, k].sum())
        actual = int(matrix[k, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    if binary:
        auc = roc_auc(y == 1, p[:, 1])
        auc_kind = "binary"
    else:
        aucs = [roc_auc(y == k, p[:, k]) for k in range(len(labels))]
        valid = [a for a in aucs if a is not None]
        auc = float(np.mean(valid)) if valid else None
        auc_kind = "one-vs-rest macro"
    result: dict[str, Any] = {
        "images": int(len(y)),
        "labels": labels,
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "balanced_accuracy": float(np.mean([per_class[n]["recall"] for n in labels if per_class[n]["support"]] or [0.0])),
        "roc_auc": auc,
        "roc_auc_kind": auc_kind,
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_axes": "rows = true label, columns = predicted label, in label order",
        "per_class": per_class,
        "macro_f1": float(np.mean([per_class[n]["f1"] for n in labels])),
    }
    if binary:
        result["threshold"] = threshold
        result["sensitivity"] = per_class[labels[1]]["recall"]
        result["specificity"] = per_class[labels[0]]["recall"]
    return result


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend, imported only here)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: dict[str, Any], path: Union[str, Path], title: str = "Confusion matrix") -> Path:
    plt = _pyplot()
    matrix = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 1.2 + 1.3 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Union[str, Path], title: str = "ROC") -> Path:
    from pneumoedge.export.onnx_export import class_probabilities

    plt = _pyplot()
    p = class_probabilities(probs)
    y = np.asarray(y_true, dtype=int)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    classes = [1] if len(labels) == 2 else range(len(labels))
    for k in classes:
        if (y == k).all() or not (y == k).any():
            continue
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        ax.plot(fpr, tpr, label=f"{labels[k]} (AUC {roc_auc(y == k, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_history(history: dict[str, list[float]], path: Union[str, Path]) -> Path:
    plt = _pyplot()
    keys = [k for k in ("loss", "accuracy", "auc") if k in history]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(
    out_dir: Union[str, Path], name: str, y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], metrics: dict[str, Any]
) -> dict[str, str]:
    """Write `<name>.json`, `<name>_confusion.png` and `<name>_roc.png`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": str(out / f"{name}.json")}
    (out / f"{name}.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    files["confusion"] = str(plot_confusion(metrics, out / f"{name}_confusion.png", f"{name}: confusion matrix"))
    files["roc"] = str(plot_roc(y_true, probs, labels, out / f"{name}_roc.png", f"{name}: ROC"))
    return files


# ---------------------------------------------------------------------------------------------
# evaluating a run (Keras) or a bundle / ONNX model (the runtime) on a labelled folder


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
            for label, folder in kaggle._label_dirs(root).items():
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
