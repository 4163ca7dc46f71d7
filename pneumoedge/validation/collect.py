"""Run a loaded bundle over a labelled listing exactly as `infer` does, keeping infer's rows.

Predictions come from the runtime's engine (`LocalEngine` -> `Ensemble.predict_many`), and the
rows are written by infer's `ResultWriter` to predictions.csv: every number of the report can be
traced to a row `pneumoedge infer` would have written for that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pneumoedge.runtime.engine import LocalEngine
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.folder import ProgressCallback, RunSummary
from pneumoedge.runtime.prediction import Prediction
from pneumoedge.runtime.results import ResultWriter
from pneumoedge.validation.data import Entry, Listing


@dataclass
class Collected:
    """What the run gave, in listing order: classified images as arrays, and the rest with reasons."""

    entries: list[Entry]  # the classified ones, aligned with the arrays
    predictions: list[Prediction]
    y: np.ndarray  # true class index
    probs: np.ndarray  # (N, K) in the model's label order
    disagreement: np.ndarray
    ood: np.ndarray  # True / False / None (object array: None when the model cannot judge)
    unreadable: list[dict[str, str]]
    skipped: list[dict[str, str]]
    summary: RunSummary

    def subset(self, keep: np.ndarray) -> "Collected":
        """The same with only the classified images where `keep` is True."""
        index = np.nonzero(keep)[0]
        return Collected([self.entries[i] for i in index], [self.predictions[i] for i in index], self.y[index],
                         self.probs[index], self.disagreement[index], self.ood[index], self.unreadable, self.skipped, self.summary)


def collect(
    ensemble: Ensemble,
    listing: Listing,
    rows: Path,
    *,
    batch_size: int = 8,
    workers: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
) -> Collected:
    """Predict every image of `listing`, write infer's rows to `rows` (CSV), and gather the results."""
    labels = list(ensemble.labels)
    writer = ResultWriter("csv", labels, [m.name for m in ensemble.members])
    summary = RunSummary(provider=ensemble.provider, output=str(rows))
    results: dict[str, Prediction] = {}
    unreadable, skipped = [], []
    total = len(listing.entries)
    written = 0

    def tick() -> None:
        if progress is not None:
            progress(written, total, summary)

    writer.open(rows, overwrite=True)
    try:
        tick()
        for entry in listing.entries:  # not images: counted and written, never run, never dropped
            if entry.kind == "image":
                continue
            writer.write(Prediction(source=str(entry.path), status=entry.kind, error=entry.reason))
            (skipped if entry.kind == "skipped" else unreadable).append({"path": str(entry.path), "label": entry.label, "reason": entry.reason})
            if entry.kind == "skipped":
                summary.skipped += 1
            else:
                summary.failed(str(entry.path), entry.reason)
            written += 1
            tick()
        engine = LocalEngine(ensemble, batch_size=batch_size, workers=workers)
        try:
            for prediction in engine.predict([e.path for e in listing.images]):
                writer.write(prediction)
                summary.record(prediction)
                results[prediction.source] = prediction
                written += 1
                tick()
        finally:
            engine.close()
    finally:
        writer.close()
    kept: list[tuple[Entry, Prediction]] = []
    for entry in listing.images:  # listing order, whatever order the engine answered in
        prediction = results[str(entry.path)]
        if prediction.status == "ok":
            kept.append((entry, prediction))
        else:
            unreadable.append({"path": str(entry.path), "label": entry.label, "reason": prediction.error})
    index = {label: k for k, label in enumerate(labels)}
    return Collected(
        entries=[e for e, _ in kept],
        predictions=[p for _, p in kept],
        y=np.array([index[e.label] for e, _ in kept], dtype=int),
        probs=np.array([[p.probabilities[label] for label in labels] for _, p in kept], dtype=np.float64).reshape(len(kept), len(labels)),
        disagreement=np.array([p.disagreement or 0.0 for _, p in kept], dtype=np.float64),
        ood=np.array([p.ood for _, p in kept], dtype=object),
        unreadable=unreadable,
        skipped=skipped,
        summary=summary,
    )
