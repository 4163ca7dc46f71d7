"""The report's plots as PNG bytes, drawn with matplotlib (the `[report]` extra) when it is installed.

matplotlib's object API (Figure + Agg canvas), not pyplot: no global state, no display needed.
Without matplotlib `available()` is False and the report keeps every number as tables.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np

from pneumoedge.validation.metrics import roc_curve

INSTALL_HINT = 'pip install "pneumoedge[report]"'
_FIGSIZE = (4.6, 3.4)


def available() -> bool:
    """Whether matplotlib can be imported here."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return False
    return True


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=_FIGSIZE, dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def roc_plot(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], points: Sequence[tuple[str, float, float]] = ()) -> bytes:
    """ROC curves [(name, y_true bool, scores)] and operating points [(name, sensitivity, specificity)]."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, y, scores in curves:
        if y.all() or (~y).all():
            continue
        fpr, tpr, _ = roc_curve(y, scores)
        axes.step(fpr, tpr, where="post", label=name)
    for name, sensitivity, specificity in points:
        axes.plot([1 - specificity], [sensitivity], "o", label=name)
    axes.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve", xlim=(0, 1), ylim=(0, 1.02))
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower right")
    return _png(figure)


def reliability_plot(series: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> bytes:
    """Reliability diagram: per calibration bin, mean predicted probability vs observed rate (dot size = count)."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8, label="perfect calibration")
    for name, bins in series:
        used = [b for b in bins if b["count"]]
        if not used:
            continue
        sizes = np.array([b["count"] for b in used], dtype=float)
        axes.plot([b["mean_probability"] for b in used], [b["observed_rate"] for b in used], "-", linewidth=1)
        axes.scatter([b["mean_probability"] for b in used], [b["observed_rate"] for b in used],
                     s=12 + 80 * sizes / sizes.max(), label=name, zorder=3)
    axes.set(xlabel="mean predicted probability", ylabel="observed rate", title="Reliability", xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(fontsize=7, loc="upper left")
    return _png(figure)


def score_plot(groups: Sequence[tuple[str, np.ndarray]], threshold: Optional[float], xlabel: str) -> bytes:
    """Histograms of the scores per true label, with the decision threshold."""
    figure = _figure()
    axes = figure.add_subplot()
    edges = np.linspace(0, 1, 21)
    for name, scores in groups:
        if len(scores):
            axes.hist(scores, bins=edges, alpha=0.55, label=f"truth {name} ({len(scores)})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    axes.set(xlabel=xlabel, ylabel="images", title="Scores by true label", xlim=(0, 1))
    axes.legend(fontsize=7)
    return _png(figure)


def disagreement_plot(edges: Sequence[float], counts: Sequence[int]) -> bytes:
    """Histogram of the members' disagreement (largest spread of a probability across members)."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.bar(np.asarray(edges[:-1]), counts, width=np.diff(edges), align="edge", edgecolor="white")
    axes.set(xlabel="disagreement between members", ylabel="images", title="Member disagreement", xlim=(0, 1))
    return _png(figure)
