"""Plots of metrics (confusion matrix, ROC, training curves; matplotlib, Agg) and a split's report files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from pneumoedge.atomic import write_atomic
from pneumoedge.validation.metrics import class_probabilities, roc_auc, roc_curve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: dict[str, Any], path: Union[str, Path], title: str = "Confusion matrix") -> Path:
    plt = _pyplot()
    matrix = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 1.2 + 1.3 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Union[str, Path], title: str = "ROC") -> Path:
    plt = _pyplot()
    p = class_probabilities(probs)
    y = np.asarray(y_true, dtype=int)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    classes = [1] if len(labels) == 2 else range(len(labels))
    for k in classes:
        if (y == k).all() or not (y == k).any():
            continue
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        ax.plot(fpr, tpr, label=f"{labels[k]} (AUC {roc_auc(y == k, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_history(history: dict[str, list[float]], path: Union[str, Path]) -> Path:
    plt = _pyplot()
    keys = [k for k in ("loss", "accuracy", "auc") if k in history]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(
    out_dir: Union[str, Path], name: str, y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], metrics: dict[str, Any]
) -> dict[str, str]:
    """Write `<name>.json`, `<name>_confusion.png` and `<name>_roc.png`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = write_atomic(out / f"{name}.json", json.dumps(metrics, indent=2) + "\n")
    return {"metrics": str(path), **plot_report(out, name, y_true, probs, labels, metrics)}


def plot_report(
    out_dir: Union[str, Path], name: str, y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], metrics: dict[str, Any]
) -> dict[str, str]:
    """Write `<name>_confusion.png` and `<name>_roc.png` into an existing folder; return their paths."""
    out = Path(out_dir)
    return {
        "confusion": str(plot_confusion(metrics, out / f"{name}_confusion.png", f"{name}: confusion matrix")),
        "roc": str(plot_roc(y_true, probs, labels, out / f"{name}_roc.png", f"{name}: ROC")),
    }
