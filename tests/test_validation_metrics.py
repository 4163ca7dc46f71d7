"""The validation metrics and the threshold grammar against hand-computed and published values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pneumoedge import thresholds
from pneumoedge.validation import metrics


@pytest.mark.parametrize(
    "successes, n, low, high",
    [
        # Newcombe (1998), Stat Med 17:857, Table I, method 3 (Wilson score without continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # by hand: 8/8 -> low = n / (n + z^2); 5/10 -> 0.5 -/+ z*sqrt(0.025 + z^2/400) / (1 + z^2/10)
        (8, 8, 8 / (8 + 1.959964**2), 1.0),
        (5, 10, 0.5 - 1.959964 * math.sqrt(0.025 + 1.959964**2 / 400) / (1 + 1.959964**2 / 10),
         0.5 + 1.959964 * math.sqrt(0.025 + 1.959964**2 / 400) / (1 + 1.959964**2 / 10)),
    ],
)
def test_wilson_interval_matches_published_and_hand_computed_values(successes, n, low, high):
    got_low, got_high = metrics.wilson_interval(successes, n)
    assert got_low == pytest.approx(low, abs=5e-5)
    assert got_high == pytest.approx(high, abs=5e-5)


def test_proportion_without_cases_says_nothing():
    assert metrics.proportion(0, 0).as_dict() == {"value": None, "ci_low": None, "ci_high": None}


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney by definition: P(score of a positive > score of a negative) + half the ties."""
    pos, neg = s[y == 1], s[y == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_roc_auc_and_delong_match_the_definitions_on_random_tied_data():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(4, 70))
        y = rng.integers(0, 2, n)
        if y.sum() < 2 or (1 - y).sum() < 2:
            continue
        s = np.round(rng.random(n) + 0.3 * y, 1)  # ties on purpose
        assert metrics.roc_auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        variance = psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg)
        auc, got = metrics.delong(y, s)
        assert auc == pytest.approx(psi.mean(), abs=1e-12)
        assert got == pytest.approx(variance, rel=1e-9, abs=1e-15)


def test_delong_on_hanley_mcneil_ratings_and_against_a_bootstrap():
    # Hanley & McNeil (1982), Radiology 143:29, Table 1: 58 normal and 51 abnormal CT ratings 1..5;
    # published AUC 0.893, standard error 0.032 (their exponential approximation)
    negatives = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    positives = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(58), np.ones(51)]
    estimate = metrics.auc_estimate(y, np.r_[negatives, positives])
    assert estimate.value == pytest.approx(0.893, abs=5e-4)
    se = (estimate.ci_high - estimate.ci_low) / (2 * metrics.Z95)
    assert se == pytest.approx(0.032, abs=0.003)
    rng = np.random.default_rng(1)
    boot = [metrics.roc_auc(y, np.r_[negatives[rng.integers(0, 58, 58)], positives[rng.integers(0, 51, 51)]]) for _ in range(400)]
    assert se == pytest.approx(float(np.std(boot)), rel=0.15)


def test_auc_estimate_with_one_class_or_single_case():
    assert metrics.auc_estimate([1, 1, 1], [0.2, 0.4, 0.9]).value is None
    single = metrics.auc_estimate([0, 1, 1], [0.1, 0.5, 0.9])
    assert single.value == 1.0 and single.ci_low is None
    separated = metrics.auc_estimate([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert separated.value == 1.0 and (separated.ci_low, separated.ci_high) == (None, None)  # no zero-width claim


def test_images_for_width_is_the_smallest_that_reaches_the_width():
    n = metrics.images_for_width(0.1, 0.9)
    low, high = metrics.wilson_interval(round(0.9 * n), n)
    assert high - low <= 0.1 + 0.01
    # one fewer case would be wider (at the expected proportion itself)
    z = metrics.Z95
    width = lambda k: 2 * z * math.sqrt(0.09 / k + z * z / (4 * k * k)) / (1 + z * z / k)  # noqa: E731
    assert width(n) <= 0.1 < width(n - 1)
    with pytest.raises(metrics.MetricsError):
        metrics.images_for_width(0.0, 0.9)


def test_predictive_values_by_bayes_rule():
    values = metrics.predictive_values(0.9, 0.8, 0.1)
    assert values["ppv"] == pytest.approx(0.09 / (0.09 + 0.18))
    assert values["npv"] == pytest.approx(0.72 / (0.72 + 0.01))


def test_calibration_ece_and_brier_by_hand():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    y = np.array([0, 1, 1, 1, 0])
    result = metrics.calibration(y, p, bins=10)
    # bins: [0,.1): mean p .05 rate .5 (2 cases); [.5,.6): .55 vs 0 (1); [.9,1]: .95 vs 1 (2)
    assert result["ece"] == pytest.approx((2 * 0.45 + 0.55 + 2 * 0.05) / 5)
    assert result["brier"] == pytest.approx((0.05**2 + 0.95**2 + 2 * 0.05**2 + 0.55**2) / 5)
    assert sum(b["count"] for b in result["bins"]) == 5


@pytest.mark.parametrize(
    "text, kind, value",
    [("fixed:0.5", "fixed", 0.5), ("sensitivity:0.9", "sensitivity", 0.9), ("sensitivity", "sensitivity", 0.95),
     ("youden", "youden", None), (" Youden ", "youden", None)],
)
def test_threshold_grammar_parses(text, kind, value):
    rule = thresholds.parse(text)
    assert (rule.kind, rule.value) == (kind, value)


@pytest.mark.parametrize("text", ["", "fixed", "fixed:", "fixed:half", "fixed:1.5", "sensitivity:-0.1", "youden:1", "spec:0.9"])
def test_threshold_grammar_refuses_with_the_grammar_named(text):
    with pytest.raises(thresholds.ThresholdError, match="fixed:X|0..1|youden"):
        thresholds.parse(text)


def test_threshold_choice_by_each_rule():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # every positive at >= 0.4; the highest threshold keeping all four is 0.4
    chosen = thresholds.choose("sensitivity:1.0", y, p)
    assert (chosen.threshold, chosen.sensitivity, chosen.specificity) == (0.4, 1.0, 0.75)
    # Youden: 0.7 gives 3/4 + 4/4 - 1 = 0.75, 0.4 gives 1 + 0.75 - 1 = 0.75: the first (higher) wins
    assert thresholds.choose("youden", y, p).threshold == 0.7
    fixed = thresholds.choose("fixed:0.65", y, p)
    assert (fixed.threshold, fixed.sensitivity, fixed.specificity) == (0.65, 0.75, 1.0)
    assert fixed.as_dict()["method"] == "fixed:0.65"
    with pytest.raises(thresholds.ThresholdError, match="only one class"):
        thresholds.choose("youden", [1, 1], [0.2, 0.3])
