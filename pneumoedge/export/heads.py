"""How a classifier's last layer reads (sigmoid, softmax or logits) and the card that says so."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pneumoedge.bundle import ModelCard
from pneumoedge.export.errors import ExportError
from pneumoedge.preprocessing import PreprocessSpec

#: Probabilities from one sigmoid unit, N softmax units, or raw logits to which the runtime
#: applies sigmoid (1 unit) or softmax (N units).
HEADS = ("sigmoid", "softmax", "logits")


def card_for(spec: PreprocessSpec, labels: Sequence[str], head: str, outputs: int) -> ModelCard:
    """The `ModelCard` for a model whose last layer is `head` with `outputs` units."""
    labels = tuple(labels)
    if head not in HEADS:
        raise ExportError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    task = "binary" if len(labels) == 2 else "multiclass"
    if outputs == 1:
        if task != "binary":
            raise ExportError(f"the model has 1 output unit but {len(labels)} labels were declared; a 1-unit head is binary")
        if head == "softmax":
            raise ExportError("the model has 1 output unit: a softmax over one unit is always 1; use --head sigmoid (or logits)")
    elif outputs != len(labels):
        raise ExportError(f"the model has {outputs} output units but {len(labels)} labels were declared ({', '.join(labels)})")
    elif head == "sigmoid":
        raise ExportError(f"the model has {outputs} output units: declare --head softmax (probabilities) or logits")
    activation = "none" if head in ("sigmoid", "softmax") else ("sigmoid" if outputs == 1 else "softmax")
    return ModelCard(spec=spec, labels=labels, task=task, activation=activation)


def check_probabilities(probs: np.ndarray, head: str) -> None:
    """Refuse outputs that cannot be what `head` declares (logits declared as probabilities)."""
    if not np.all(np.isfinite(probs)):
        raise ExportError("the model produced NaN or infinite outputs on the reference images")
    if head == "logits":
        return
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ExportError(
            f"--head {head} declares probabilities, but outputs range {probs.min():.3g}..{probs.max():.3g}; "
            "the model seems to output logits: use --head logits"
        )
    if head == "softmax" and probs.shape[1] > 1 and np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise ExportError("--head softmax declares probabilities, but the outputs do not sum to 1: use --head logits")
