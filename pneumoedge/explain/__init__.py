"""Heatmaps at the clinic: where the model looked, from the exported graph (no TensorFlow).

Each member's ONNX graph computes a Grad-CAM map beside its probabilities (built at export,
`pneumoedge.export.gradcam`); this package normalises the maps, averages an ensemble's
members with its weights, maps them back onto the original image and draws overlays.
`Ensemble.predict(source, explain=True)` fills `Prediction.explanation` with an `Explanation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np

from pneumoedge.explain.maps import to_original
from pneumoedge.explain.overlay import NOTICE, OOD_WARNING, render, write_png_atomic

__all__ = ["Explanation", "NOTICE", "OOD_WARNING", "write_png_atomic"]


@dataclass(frozen=True, eq=False)
class Explanation:
    """An image's heatmap: 0..1, where the explained score rose (see `score`).

    `grid_map` is the ensemble's map on a working grid of the image's aspect; `heatmap` is
    the same on the original image's pixel grid. An all-zero map is an answer: nothing in the
    image raised the score. `sources` says, per member, which graph gave its map.
    """

    grid_map: np.ndarray
    original_size: tuple[int, int]
    display: np.ndarray = field(repr=False)
    sources: dict[str, str]
    score: str
    caption: tuple[str, ...] = ()
    ood: Optional[bool] = None

    @cached_property
    def heatmap(self) -> np.ndarray:
        """float32 (height, width) of the original image, 0..1."""
        return to_original(self.grid_map, self.original_size)

    @property
    def empty(self) -> bool:
        return float(self.grid_map.max()) <= 0.0

    def overlay(self, max_side: int = 1024) -> np.ndarray:
        """uint8 RGB: the X-ray (as the classifier saw it) with the heatmap, legend and notice."""
        lines = list(self.caption)
        if self.empty:
            lines.append(f"Empty heatmap: no region raised the {self.score}.")
        warning = OOD_WARNING if self.ood else None
        return render(self.display, self.grid_map, lines, max_side=max_side, warning=warning)
