"""Classification metrics and their uncertainty, numpy only (no scikit-learn, no TensorFlow).

The one home of ROC AUC, the ROC curve, the confusion matrix, sensitivity/specificity and the
metrics table used by `evaluate`, `validate` and the export side. Intervals:

- a proportion (sensitivity, specificity, ...): Wilson score interval, which stays inside 0..1
  and keeps its coverage for small counts (8/8 -> 0.68..1), unlike the Wald interval;
- ROC AUC: DeLong's variance of the Mann-Whitney statistic (DeLong, DeLong & Clarke-Pearson
  1988, fast midrank form of Sun & Xu 2014), normal interval clipped to 0..1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

#: Two-sided 95 % normal quantile.
Z95 = 1.959963984540054


class MetricsError(ValueError):
    """Inputs that do not fit together (probability columns vs labels, lengths)."""


@dataclass(frozen=True)
class Estimate:
    """A value with its 95 % interval; `None` throughout when the data cannot tell (no cases)."""

    value: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    method: str

    def as_dict(self) -> dict[str, Optional[float]]:
        """{"value", "ci_low", "ci_high"} (report.json's contract)."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


# ---------------------------------------------------------------------------------------------
# counts and curves


def class_probabilities(probs: Any) -> np.ndarray:
    """(N,) or (N, 1) probability of labels[1] -> (N, 2); (N, K) stays."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.shape[1] == 1:
        return np.concatenate([1.0 - probs, probs], axis=1)
    return probs


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[0, np.nonzero(np.diff(ordered))[0] + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(y_true: Any, scores: Any) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    return float((_midranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting positive when score >= threshold, thresholds descending."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
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


# ---------------------------------------------------------------------------------------------
# intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[Optional[float], Optional[float]]:
    """Wilson score interval of successes/n; (None, None) when n == 0."""
    if n <= 0:
        return None, None
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0 or n successes the exact bound is 0 or 1; rounding must not leave it a hair off
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion(successes: int, n: int) -> Estimate:
    """successes/n with its Wilson 95 % interval."""
    low, high = wilson_interval(successes, n)
    return Estimate(successes / n if n else None, low, high, "Wilson score 95 %")


def delong(y_true: Any, scores: Any) -> tuple[Optional[float], Optional[float]]:
    """(AUC, its DeLong variance); (None, None) with one class, variance None with one case of a class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    positives, negatives = s[y], s[~y]
    m, n = len(positives), len(negatives)
    if m == 0 or n == 0:
        return None, None
    combined = _midranks(np.r_[positives, negatives])
    within_pos, within_neg = _midranks(positives), _midranks(negatives)
    auc = float((combined[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    if m < 2 or n < 2:
        return auc, None
    # structural components: each positive's share of negatives it outranks, and vice versa
    v10 = (combined[:m] - within_pos) / n
    v01 = 1.0 - (combined[m:] - within_neg) / m
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    return auc, variance


def auc_estimate(y_true: Any, scores: Any) -> Estimate:
    """ROC AUC with a DeLong 95 % interval (normal, clipped to 0..1); no interval where DeLong's variance is 0."""
    auc, variance = delong(y_true, scores)
    if auc is None:
        return Estimate(None, None, None, "DeLong 95 %")
    if variance is None or variance <= 0.0:
        # one case of a class, or classes perfectly separated: DeLong's variance is 0 there, and a
        # zero-width interval would claim certainty that a small sample cannot give
        return Estimate(auc, None, None, "DeLong 95 %")
    half = Z95 * math.sqrt(max(variance, 0.0))
    return Estimate(auc, max(0.0, auc - half), min(1.0, auc + half), "DeLong 95 %")


def images_for_width(width: float, expected: float, z: float = Z95) -> int:
    """The fewest cases whose Wilson 95 % interval around `expected` is at most `width` wide.

    For sensitivity the cases are positives, for specificity negatives: divide by the
    prevalence to get all images.
    """
    if not 0.0 < width < 1.0:
        raise MetricsError(f"interval width {width}: give a number between 0 and 1 (e.g. 0.1)")
    p = min(max(expected, 0.0), 1.0)

    def wide(n: int) -> float:
        return 2 * z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)

    low, high = 1, 1
    while wide(high) > width:  # the width falls monotonically with n
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if wide(middle) > width:
            low = middle + 1
        else:
            high = middle
    return high


# ---------------------------------------------------------------------------------------------
# predictive values and calibration


def predictive_values(sensitivity: Optional[float], specificity: Optional[float], prevalence: float) -> dict[str, Optional[float]]:
    """PPV and NPV by Bayes' rule at `prevalence` (0..1)."""
    if sensitivity is None or specificity is None:
        return {"prevalence": prevalence, "ppv": None, "npv": None}
    true_pos = sensitivity * prevalence
    false_pos = (1 - specificity) * (1 - prevalence)
    true_neg = specificity * (1 - prevalence)
    false_neg = (1 - sensitivity) * prevalence
    ppv = true_pos / (true_pos + false_pos) if true_pos + false_pos > 0 else None
    npv = true_neg / (true_neg + false_neg) if true_neg + false_neg > 0 else None
    return {"prevalence": prevalence, "ppv": ppv, "npv": npv}


def calibration(y_true: Any, p_positive: Any, bins: int = 10) -> dict[str, Any]:
    """Reliability in `bins` equal-width bins of p, expected calibration error and Brier score.

    Returns:
        {"ece", "brier", "bins": [{"low", "high", "count", "mean_probability", "observed_rate"}]};
        ECE weights each bin's |mean p - observed rate| by its share of the cases.
    """
    y = np.asarray(y_true).astype(np.float64).ravel()
    p = np.asarray(p_positive, dtype=np.float64).ravel()
    if len(y) == 0:
        return {"ece": None, "brier": None, "bins": []}
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        mean_p = float(p[inside].mean()) if count else None
        rate = float(y[inside].mean()) if count else None
        if count:
            ece += count / len(y) * abs(mean_p - rate)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                      "mean_probability": mean_p, "observed_rate": rate})
    return {"ece": float(ece), "brier": float(np.mean((p - y) ** 2)), "bins": table}


# ---------------------------------------------------------------------------------------------
# the metrics table


def classification_metrics(y_true: Any, probs: Any, labels: Sequence[str], threshold: Optional[float] = None) -> dict[str, Any]:
    """Confusion matrix, per-class precision/recall/F1, accuracy, ROC AUC.

    Args:
        y_true: class indices into `labels`.
        probs: (N, K) class probabilities, or (N,)/(N, 1) probability of labels[1] for binary.
        threshold: binary decision threshold on p(labels[1]) (default 0.5); ignored for multiclass.
    """
    labels = list(labels)
    y = np.asarray(y_true, dtype=int)
    p = class_probabilities(probs)
    if p.shape[1] != len(labels):
        raise MetricsError(f"{p.shape[1]} probability columns for {len(labels)} labels")
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
