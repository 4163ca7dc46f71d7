"""Every number of a validation for one set of images: intervals, threshold table, calibration, precision.

Pure numpy over arrays (true class, probabilities, disagreement), so the same function serves
all images and the in-distribution ones, and tests can feed it hand-made numbers.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from pneumoedge.thresholds import ThresholdError, choose
from pneumoedge.validation.metrics import (
    auc_estimate,
    calibration,
    confusion_matrix,
    images_for_width,
    predictive_values,
    proportion,
    wilson_interval,
)

#: Target sensitivities of the threshold table.
TARGETS = (0.90, 0.95, 0.98)
#: Summary statistics of the members' disagreement.
_QUANTILES = {"median": 0.5, "p90": 0.9}


def analyse(
    y: Sequence[int],
    probs: np.ndarray,
    labels: Sequence[str],
    *,
    threshold: Optional[float],
    disagreement: Sequence[float],
    prevalence: Optional[float] = None,
    width: float = 0.1,
    targets: Sequence[float] = TARGETS,
) -> dict[str, Any]:
    """The numbers for one set of images.

    Args:
        y: true class index per image (into `labels`).
        probs: (N, K) probabilities, columns in `labels` order.
        threshold: the binary decision threshold on p(labels[1]); None for multi-class (arg-max).
        disagreement: per image, the members' largest spread of a probability.
        prevalence: a prevalence (0..1) to state PPV/NPV at, besides the sample's.
        width: the 95 % interval width the precision note asks enough images for.
    """
    labels = list(labels)
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y), len(labels))
    result: dict[str, Any] = {
        "n": int(len(y)),
        "per_label": {label: int((y == k).sum()) for k, label in enumerate(labels)},
        "disagreement": _disagreement(np.asarray(disagreement, dtype=np.float64)),
    }
    if len(y) == 0:
        return {**result, **_empty(labels, threshold, targets)}
    if len(labels) == 2 and threshold is not None:
        result.update(_binary(y, probs[:, 1], threshold, prevalence, width, targets))
    else:
        result.update(_multiclass(y, probs, labels, prevalence, width))
    return result


def _binary(y: np.ndarray, p: np.ndarray, threshold: float, prevalence: Optional[float], width: float,
            targets: Sequence[float]) -> dict[str, Any]:
    positive = y == 1
    predicted = p >= threshold
    tp, fn = int((predicted & positive).sum()), int((~predicted & positive).sum())
    tn, fp = int((~predicted & ~positive).sum()), int((predicted & ~positive).sum())
    sensitivity, specificity = proportion(tp, tp + fn), proportion(tn, tn + fp)
    sample_prevalence = (tp + fn) / len(y)
    return {
        "threshold": float(threshold),
        "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        "sensitivity": sensitivity.as_dict(),
        "specificity": specificity.as_dict(),
        "accuracy": proportion(tp + tn, len(y)).as_dict(),
        "roc_auc": auc_estimate(positive, p).as_dict(),
        "predictive_values": _predictive(tp, fp, tn, fn, sensitivity.as_dict(), specificity.as_dict(), sample_prevalence, prevalence),
        "thresholds": _threshold_table(positive, p, targets),
        "calibration": calibration(positive, p),
        "precision_note": _precision(width, sample_prevalence, [("sensitivity", sensitivity.value, tp + fn, "positive"),
                                                               ("specificity", specificity.value, tn + fp, "negative")]),
    }


def _predictive(tp: int, fp: int, tn: int, fn: int, sens: dict, spec: dict, sample: float, given: Optional[float]) -> list[dict[str, Any]]:
    """PPV/NPV at the sample's prevalence (Wilson intervals of the counts) and at a stated one.

    At a stated prevalence the interval runs from both proportions' lower bounds to both upper
    bounds (PPV and NPV rise with sensitivity and specificity), a conservative range.
    """
    rows = [{"prevalence": sample, "source": "this sample",
             "ppv": proportion(tp, tp + fp).as_dict(), "npv": proportion(tn, tn + fn).as_dict()}]
    if given is not None:
        point = predictive_values(sens["value"], spec["value"], given)
        low = predictive_values(sens["ci_low"], spec["ci_low"], given)
        high = predictive_values(sens["ci_high"], spec["ci_high"], given)
        rows.append({"prevalence": given, "source": "stated (--prevalence)",
                     "ppv": {"value": point["ppv"], "ci_low": low["ppv"], "ci_high": high["ppv"]},
                     "npv": {"value": point["npv"], "ci_low": low["npv"], "ci_high": high["npv"]}})
    return rows


def _threshold_table(positive: np.ndarray, p: np.ndarray, targets: Sequence[float]) -> list[dict[str, Any]]:
    """For each target sensitivity, the highest threshold reaching it here, and the specificity it costs."""
    rows = []
    for target in targets:
        try:
            chosen = choose(f"sensitivity:{target}", positive, p)
        except ThresholdError:  # one class only: nothing to choose on
            rows.append({"target_sensitivity": target, "threshold": None, "sensitivity": None, "specificity": None})
            continue
        negatives = int((~positive).sum())
        low, high = wilson_interval(round(chosen.specificity * negatives), negatives)
        rows.append({"target_sensitivity": target, "threshold": chosen.threshold, "sensitivity": chosen.sensitivity,
                     "specificity": chosen.specificity, "specificity_ci": [low, high]})
    return rows


def _precision(width: float, prevalence: float, parts: Sequence[tuple[str, Optional[float], int, str]]) -> dict[str, Any]:
    """How many cases (and images at this prevalence) a 95 % interval of `width` needs, per proportion."""
    rows = []
    for name, value, cases, kind in parts:
        expected = 0.9 if value is None else value
        needed = images_for_width(width, expected)
        share = prevalence if kind == "positive" else 1 - prevalence
        low, high = wilson_interval(round(expected * cases), cases) if cases else (None, None)
        rows.append({
            "metric": name, "expected": expected, "cases": cases, "cases_kind": kind,
            "current_width": None if low is None else high - low,
            "cases_needed": needed,
            "images_needed": math.ceil(needed / share) if share > 0 else None,
        })
    return {"width": width, "rows": rows}


def _multiclass(y: np.ndarray, probs: np.ndarray, labels: list[str], prevalence: Optional[float], width: float) -> dict[str, Any]:
    """One-vs-rest equivalents per class, on the arg-max decision."""
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, len(labels))
    per_class = {}
    for k, label in enumerate(labels):
        actual, chosen = y == k, predicted == k
        tp, fn = int((actual & chosen).sum()), int((actual & ~chosen).sum())
        tn, fp = int((~actual & ~chosen).sum()), int((~actual & chosen).sum())
        sens, spec = proportion(tp, tp + fn), proportion(tn, tn + fp)
        share = (tp + fn) / len(y)
        per_class[label] = {
            "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
            "sensitivity": sens.as_dict(), "specificity": spec.as_dict(),
            "roc_auc": auc_estimate(actual, probs[:, k]).as_dict(),
            "predictive_values": _predictive(tp, fp, tn, fn, sens.as_dict(), spec.as_dict(), share, prevalence),
            "calibration": calibration(actual, probs[:, k]),
            "precision_note": _precision(width, share, [("sensitivity", sens.value, tp + fn, "positive")]),
        }
    onehot = np.eye(len(labels))[y]
    return {
        "threshold": None,
        "decision": "arg-max (multi-class)",
        "confusion_matrix": matrix.tolist(),
        "accuracy": proportion(int((predicted == y).sum()), len(y)).as_dict(),
        "sensitivity": {"value": None, "ci_low": None, "ci_high": None},
        "specificity": {"value": None, "ci_low": None, "ci_high": None},
        "roc_auc": {"value": None, "ci_low": None, "ci_high": None},
        "calibration": {"ece": _top_label_ece(y, probs), "brier": float(np.mean(((probs - onehot) ** 2).sum(axis=1))), "bins": []},
        "thresholds": [],
        "per_class": per_class,
    }


def _top_label_ece(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE of the arg-max class's probability against whether it was right."""
    confidence = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    return float(calibration(right, confidence, bins)["ece"])


def _disagreement(values: np.ndarray) -> dict[str, Any]:
    if len(values) == 0:
        return {"mean": None, "median": None, "p90": None, "max": None, "histogram": {"edges": [], "counts": []}}
    edges = np.linspace(0.0, 1.0, 11)
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)
    summary = {name: float(np.quantile(values, q)) for name, q in _QUANTILES.items()}
    return {"mean": float(values.mean()), **summary, "max": float(values.max()),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _empty(labels: list[str], threshold: Optional[float], targets: Sequence[float]) -> dict[str, Any]:
    nothing = {"value": None, "ci_low": None, "ci_high": None}
    return {
        "threshold": threshold, "sensitivity": nothing, "specificity": nothing, "accuracy": nothing, "roc_auc": nothing,
        "calibration": {"ece": None, "brier": None, "bins": []},
        "thresholds": [{"target_sensitivity": t, "threshold": None, "sensitivity": None, "specificity": None} for t in targets]
        if len(labels) == 2 else [],
    }
