"""`validation.analysis` on hand-made numbers: counts, predictive values, threshold table, precision note."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoedge.validation.analysis import analyse
from pneumoedge.validation.metrics import images_for_width, wilson_interval

LABELS = ("NORMAL", "PNEUMONIA")


def _binary(prevalence=None):
    # 4 negatives at 0.1 0.2 0.3 0.6, 4 positives at 0.4 0.7 0.8 0.9; threshold 0.5 -> TP 3, FN 1, TN 3, FP 1
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    probs = np.stack([1 - p, p], axis=1)
    return analyse(y, probs, LABELS, threshold=0.5, disagreement=np.linspace(0, 0.7, 8), prevalence=prevalence)


def test_binary_counts_intervals_and_auc():
    result = _binary()
    assert result["confusion"] == {"tp": 3, "fn": 1, "tn": 3, "fp": 1}
    low, high = wilson_interval(3, 4)
    assert result["sensitivity"] == {"value": 0.75, "ci_low": low, "ci_high": high}
    assert result["roc_auc"]["value"] == pytest.approx(15 / 16)  # of 16 pairs only (0.4 positive, 0.6 negative) is lost
    assert result["per_label"] == {"NORMAL": 4, "PNEUMONIA": 4} and result["n"] == 8


def test_predictive_values_at_sample_and_stated_prevalence():
    result = _binary(prevalence=0.1)
    sample, stated = result["predictive_values"]
    assert sample["prevalence"] == 0.5 and sample["ppv"]["value"] == 0.75  # 3 of 4 called positive
    # Bayes at 10 %: PPV = .75*.1 / (.75*.1 + .25*.9) = 0.25
    assert stated["ppv"]["value"] == pytest.approx(0.25) and stated["npv"]["value"] == pytest.approx(0.675 / 0.7)
    assert stated["ppv"]["ci_low"] < 0.25 < stated["ppv"]["ci_high"]


def test_threshold_table_reports_the_specificity_each_target_costs():
    table = {row["target_sensitivity"]: row for row in _binary()["thresholds"]}
    assert table[0.9]["threshold"] == 0.4 and table[0.9]["sensitivity"] == 1.0 and table[0.9]["specificity"] == 0.75
    assert table[0.98]["threshold"] == 0.4


def test_precision_note_counts_cases_and_images():
    note = _binary()["precision_note"]
    sens = note["rows"][0]
    assert sens["metric"] == "sensitivity" and sens["cases"] == 4
    assert sens["cases_needed"] == images_for_width(0.1, 0.75) and sens["images_needed"] == 2 * sens["cases_needed"]


def test_disagreement_summary_and_empty_subset():
    result = _binary()
    assert result["disagreement"]["max"] == pytest.approx(0.7) and sum(result["disagreement"]["histogram"]["counts"]) == 8
    empty = analyse([], np.zeros((0, 2)), LABELS, threshold=0.5, disagreement=[])
    assert empty["n"] == 0 and empty["sensitivity"]["value"] is None and empty["thresholds"][0]["threshold"] is None


def test_one_class_only_leaves_what_cannot_be_known_empty():
    p = np.array([0.2, 0.7, 0.9])
    result = analyse([1, 1, 1], np.stack([1 - p, p], axis=1), LABELS, threshold=0.5, disagreement=[0, 0, 0])
    assert result["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert result["specificity"]["value"] is None and result["roc_auc"]["value"] is None
    assert all(row["threshold"] is None for row in result["thresholds"])
