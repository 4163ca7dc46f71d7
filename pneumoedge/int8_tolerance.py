"""THE int8 tolerance: how close an int8 member must stay to its fp32 model.

One home for export (which refuses or warns beyond it) and the runtime (which trusts a bundle's
int8 member only within it). No dependencies: the runtime side imports it without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Largest accepted |p_int8 - p_fp32| over the check images (any class probability).
INT8_MAX_PROB_DIFF = 0.05
#: Smallest accepted share of images whose label int8 and fp32 agree on.
INT8_MIN_AGREEMENT = 0.98


@dataclass(frozen=True)
class Tolerance:
    """What int8 must keep: the largest |p_int8 - p_fp32| and the share of identical labels."""

    max_prob_diff: float = INT8_MAX_PROB_DIFF
    min_agreement: float = INT8_MIN_AGREEMENT

    def holds(self, max_prob_diff: float, agreement: float) -> bool:
        """Whether measured figures are within this tolerance."""
        return bool(max_prob_diff <= self.max_prob_diff and agreement >= self.min_agreement)
