"""Metrics in numpy (no scikit-learn) and the decision threshold chosen on validation data.

Threshold policy (binary): by default the threshold is the HIGHEST one that still reaches a
target sensitivity of 0.95 for PNEUMONIA on the validation split ("sensitivity:0.95"): a missed
pneumonia costs more than a false alarm, so sensitivity is fixed first and specificity is the
best that remains. "youden" (max sensitivity + specificity - 1) and "fixed:0.5" are the other
choices. Multiclass models take the arg-max and have no threshold.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from pneumoedge.export.errors import ExportError

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
