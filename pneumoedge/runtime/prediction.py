"""One input's result: label, probabilities, members' view, and the heatmap / OOD flag when asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """One input's result. Decision support for clinicians, never a diagnosis.

    `probability` is that of `label`; `probabilities` has every label's. For a binary task the
    label is the positive one when its probability reaches `threshold`. `disagreement` is the
    largest spread (max - min) of any label's probability across members (0 for one member).
    """

    source: str
    status: str  # "ok" or "error"
    label: Optional[str] = None
    probability: Optional[float] = None
    probabilities: dict[str, float] = field(default_factory=dict)
    member_probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    disagreement: Optional[float] = None
    threshold: Optional[float] = None
    provider: Optional[str] = None
    error: str = ""
    #: Out-of-distribution flag and score (None: the model carries no statistics to judge).
    ood: Optional[bool] = None
    ood_score: Optional[float] = None
    #: Where the heatmap overlay of this image was written ("" when none was asked for).
    overlay_path: str = ""
    #: The heatmap, when predicted with `explain=True` (see `pneumoedge.explain`).
    explanation: Optional[Any] = field(default=None, repr=False, compare=False)

    @property
    def heatmap(self) -> Optional[np.ndarray]:
        """float32 (height, width) of the original image, 0..1; None unless predicted with explain=True."""
        return None if self.explanation is None else self.explanation.heatmap

    def overlay(self, max_side: int = 1024) -> np.ndarray:
        """uint8 RGB: the X-ray with the heatmap, a legend, the result and the decision-support notice.

        Raises ValueError when this prediction has no heatmap (see `Ensemble.explain_note`).
        """
        if self.explanation is None:
            raise ValueError(f"{self.source}: no heatmap (predict with explain=True, on a model whose graphs carry heatmaps)")
        return self.explanation.overlay(max_side)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "status": self.status,
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "member_probabilities": self.member_probabilities,
            "disagreement": self.disagreement,
            "threshold": self.threshold,
            "provider": self.provider,
            "ood": self.ood,
            "ood_score": self.ood_score,
            "overlay": self.overlay_path,
            "error": self.error,
        }
