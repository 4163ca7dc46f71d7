"""THE decision-threshold grammar for binary bundles: parse `fixed:X`, `sensitivity:S`, `youden`, and choose.

One grammar for `bundle create --threshold`, `export --threshold-method`, `train --threshold`
and `validate --site-threshold`:

- ``fixed:X``        X itself (0..1), declared, no data needed;
- ``sensitivity:S``  the HIGHEST threshold whose sensitivity on the labelled data is still >= S
                     (a missed pneumonia costs more than a false alarm, so sensitivity is fixed
                     first and specificity is the best that remains); ``sensitivity`` alone is 0.95;
- ``youden``         the threshold maximising sensitivity + specificity - 1.

A case is called positive when p(labels[1]) >= threshold. numpy only (runtime side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from pneumoedge.validation.metrics import roc_curve

#: The default policy when a threshold is chosen on validation data.
DEFAULT_THRESHOLD_METHOD = "sensitivity:0.95"
#: What `sensitivity` without a value means.
DEFAULT_TARGET_SENSITIVITY = "0.95"
GRAMMAR = "fixed:X (X in 0..1), sensitivity:S (S in 0..1; chosen on labelled data) or youden (chosen on labelled data)"
KINDS = ("fixed", "sensitivity", "youden")


class ThresholdError(ValueError):
    """A threshold text that does not follow the grammar, or data a rule cannot choose on."""


@dataclass(frozen=True)
class ThresholdRule:
    """A parsed threshold text: `kind` in KINDS, `value` (None for youden), `text` as the user wrote it."""

    kind: str
    value: Optional[float]
    text: str

    @property
    def needs_data(self) -> bool:
        """True when the threshold is chosen on labelled data (sensitivity, youden)."""
        return self.kind != "fixed"


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold and what it gives on the data it was chosen on."""

    threshold: float
    method: str
    description: str
    sensitivity: float
    specificity: float
    images: int

    def as_dict(self) -> dict[str, Any]:
        """{"threshold", "method", "description", "sensitivity", "specificity"} (the manifest's record)."""
        return {"threshold": self.threshold, "method": self.method, "description": self.description,
                "sensitivity": self.sensitivity, "specificity": self.specificity}


def parse(text: Union[str, ThresholdRule]) -> ThresholdRule:
    """Parse `fixed:X`, `sensitivity:S` (or `sensitivity`, meaning 0.95) or `youden`.

    Raises:
        ThresholdError: naming the grammar, for anything else.
    """
    if isinstance(text, ThresholdRule):
        return text
    if not isinstance(text, str):
        raise ThresholdError(f"threshold {text!r}: write {GRAMMAR}")
    kind, colon, raw = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "youden":
        if colon:
            raise ThresholdError(f"threshold {text!r}: youden takes no value; write youden")
        return ThresholdRule("youden", None, text)
    if kind == "sensitivity":
        return ThresholdRule("sensitivity", _unit_number(raw if raw.strip() else DEFAULT_TARGET_SENSITIVITY, text), text)
    if kind == "fixed":
        if not colon or not raw.strip():
            raise ThresholdError(f"threshold {text!r}: write fixed:X with X a number in 0..1 (e.g. fixed:0.5)")
        return ThresholdRule("fixed", _unit_number(raw, text), text)
    raise ThresholdError(f"threshold {text!r}: write {GRAMMAR}")


def choose(rule: Union[str, ThresholdRule], y_true: Any, p_positive: Any) -> ThresholdChoice:
    """Choose the binary threshold by `rule` on labelled scores.

    Args:
        rule: a ThresholdRule or its text.
        y_true: 0/1 (or bool), 1 = labels[1] (the positive finding).
        p_positive: the probability of labels[1], one per case.

    Raises:
        ThresholdError: a data rule on data with one class only, or mismatched lengths.
    """
    rule = parse(rule)
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(p_positive, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise ThresholdError(f"{len(y)} labels for {len(p)} scores")
    if rule.kind == "fixed":
        threshold = float(rule.value)
    else:
        if len(y) == 0 or y.all() or (~y).all():
            raise ThresholdError(f"cannot choose a threshold by {rule.text!r}: the labelled data has only one class")
        fpr, tpr, thresholds = roc_curve(y, p)
        finite = np.isfinite(thresholds)
        if rule.kind == "youden":
            threshold = float(thresholds[int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))])
        else:
            reaching = np.nonzero(finite & (tpr >= rule.value - 1e-12))[0]
            threshold = float(thresholds[reaching[0]]) if len(reaching) else float(p.min())
        threshold = float(np.clip(threshold, 0.0, 1.0))
    predicted = p >= threshold
    sensitivity = float((predicted & y).sum() / max(int(y.sum()), 1))
    specificity = float((~predicted & ~y).sum() / max(int((~y).sum()), 1))
    description = (
        f"{_name(rule)} on validation data ({len(y)} images): "
        f"sensitivity {sensitivity:.3f}, specificity {specificity:.3f} at threshold {threshold:.4f}"
    )
    return ThresholdChoice(threshold, rule.text, description, sensitivity, specificity, int(len(y)))


def _name(rule: ThresholdRule) -> str:
    if rule.kind == "sensitivity":
        # the target as the user wrote it, so that recorded descriptions stay as they were
        raw = rule.text.partition(":")[2]
        return f"target sensitivity {raw or DEFAULT_TARGET_SENSITIVITY}"
    return {"fixed": "fixed", "youden": "Youden J"}[rule.kind]


def _unit_number(raw: str, text: str) -> float:
    try:
        number = float(raw)
    except ValueError:
        raise ThresholdError(f"threshold {text!r}: {raw.strip()!r} is not a number; write {GRAMMAR}") from None
    if not 0.0 <= number <= 1.0:
        raise ThresholdError(f"threshold {text!r}: the value must lie in 0..1")
    return number
