"""Front door for training runs: run folders -> parity-checked fp32 members -> `build_bundle`.

The ensemble's threshold is chosen on the ensemble's own validation probabilities (the runs'
recorded patient-level validation split, run through the exported fp32 ONNX members), not
copied from one member.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import MemberSource
from pneumoedge.export.bundle_builder import (
    CALIBRATION_IMAGES,
    BuildState,
    BundleOptions,
    BundleResult,
    ExportedMember,
    TensorValidation,
    build_bundle,
)
from pneumoedge.export.errors import ExportError
from pneumoedge.export.onnx_export import export_keras
from pneumoedge.export.report import SYNTHETIC_NOTICE, Progress, quiet, report_export, slim
from pneumoedge.export.tensors import evenly, load_tensors
from pneumoedge.export.training import Run, read_run
from pneumoedge.thresholds import DEFAULT_THRESHOLD_METHOD, ThresholdRule


def export_runs(
    run_dirs: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    options: BundleOptions = BundleOptions(),
    *,
    weights: Optional[Sequence[float]] = None,
    progress: Progress = quiet,
) -> BundleResult:
    """Export trained runs to one ensemble bundle, parity-checked, optionally with int8 members.

    Args:
        run_dirs: run folders from `train` (same task and labels).
        out_dir: the bundle folder.
        options: int8 (calibration default: each run's recorded training split), parity images
            (default: the runs' validation images), threshold rule (default: the first run's).
        weights: one per run (default equal).

    Returns:
        BundleResult; the manifest's default precision is "int8" only when every int8 member
        met the tolerance.
    """
    started = time.perf_counter()
    steps: dict[str, float] = {}
    runs = _read_runs(run_dirs)
    names = _member_names(runs)
    weights = _weights(weights, len(runs))
    labels, task = runs[0].labels, runs[0].task
    rule = options.threshold or runs[0].record.get("options", {}).get("threshold_method", DEFAULT_THRESHOLD_METHOD)
    val_files, y_val = _validation_files(runs)
    with tempfile.TemporaryDirectory(prefix="pneumoedge-export-") as tmp:
        work = Path(tmp)
        members = [
            _export_member(run, name, weight, options, val_files, work, steps, progress)
            for run, name, weight in zip(runs, names, weights)
        ]
        validation = None
        if val_files:
            tensors = {name: load_tensors(val_files, run.spec) for run, name in zip(runs, names)}
            validation = TensorValidation(y_val, tensors, f"{len(val_files)} validation images of the runs")
        return build_bundle(
            out_dir, members, work, labels=labels, task=task, options=replace(options, threshold=rule),
            describe=lambda state: run_provenance(runs, state), validation=validation, fallback=_members_threshold(runs),
            progress=progress, started=started, steps=steps,
        )


def _read_runs(run_dirs: Sequence[Union[str, Path]]) -> list[Run]:
    runs = [read_run(d) for d in run_dirs]
    if not runs:
        raise ExportError("give at least one run folder")
    first = runs[0]
    for run in runs[1:]:
        if run.labels != first.labels or run.task != first.task:
            raise ExportError(f"{run.run_dir}: task/labels {run.task}/{list(run.labels)} differ from {first.run_dir}'s {first.task}/{list(first.labels)}")
    return runs


def _member_names(runs: Sequence[Run]) -> list[str]:
    names = [run.name for run in runs]
    return names if len(set(names)) == len(names) else [f"{n}_{i}" for i, n in enumerate(names)]


def _weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count or any(w <= 0 for w in weights):
        raise ExportError(f"give one positive weight per model ({count}), got {list(weights)}")
    return weights


def _export_member(
    run: Run, name: str, weight: float, options: BundleOptions, val_files: Sequence[Path], work: Path,
    steps: dict[str, float], progress: Progress,
) -> ExportedMember:
    """One run's Keras model as a parity-checked fp32 member; its training split calibrates int8 and fits the statistics."""
    started = time.perf_counter()
    progress(f"exporting {name} to ONNX (parity check)")
    parity_dir = options.images
    if parity_dir is None and val_files:
        parity_dir = _link_folder(work / f"parity_{name}", val_files[:32])
    result = export_keras(
        run.run_dir, work / f"{name}.fp32.onnx", spec=run.spec, labels=run.labels,
        head=run.record.get("head", "sigmoid"), images=parity_dir, tolerance=options.parity_tolerance,
        heatmaps=options.heatmaps, heatmap_layer=options.heatmap_layer,
    )
    steps[f"export {name}"] = time.perf_counter() - started
    report_export(result, progress)
    train_files = [Path(e["path"]) for e in run.split()["train"]]
    return ExportedMember(
        name, MemberSource(result.onnx_path, name, run.spec, "fp32", weight, result.card.activation, result.card.explain), result,
        calibration=lambda: load_tensors(evenly(train_files, CALIBRATION_IMAGES), run.spec),
        references=[f for f in train_files if f.is_file()],
        references_described=f"{{used}} training images of run {run.run_dir.name}",
    )


def _validation_files(runs: Sequence[Run]) -> tuple[list[Path], np.ndarray]:
    """Files in every run's recorded validation split (the same split when data and seed match)."""
    labels = runs[0].labels
    common: Optional[dict[str, str]] = None
    for run in runs:
        val = {entry["path"]: entry["target"] for entry in run.split()["val"]}
        common = val if common is None else {p: t for p, t in common.items() if p in val}
    files = sorted(p for p in (common or {}) if Path(p).is_file())
    return [Path(p) for p in files], np.array([labels.index(common[p]) for p in files], dtype=int)


def _members_threshold(runs: Sequence[Run]) -> Callable[[Optional[ThresholdRule]], dict[str, Any]]:
    """Without a shared validation split: the mean of the members' own validation thresholds."""

    def fallback(_: Optional[ThresholdRule]) -> dict[str, Any]:
        values = [r.threshold for r in runs if r.threshold is not None]
        return {"threshold": float(np.mean(values)) if values else 0.5, "method": "members",
                "description": "mean of the members' validation thresholds (no shared validation split)"}

    return fallback


def run_provenance(runs: Sequence[Run], state: BuildState) -> dict[str, Any]:
    """The bundle's provenance for training runs: their data, metrics, parity and int8 figures."""
    data_records = [run.record.get("provenance", {}) for run in runs]
    synthetic = any(r.get("synthetic") for r in data_records)
    record: dict[str, Any] = {
        "created_by": "pneumoedge export",
        "synthetic": synthetic,
        "notice": SYNTHETIC_NOTICE if synthetic else "trained by the user; validate clinically before any use",
        "data": sorted({r.get("data", "?") for r in data_records}),
        "threshold": state.threshold,
        "metrics": slim(state.metrics),
        "members": {},
    }
    for run, member in zip(runs, state.members):
        entry = {
            "arch": run.record.get("arch"),
            "parameters": run.record.get("parameters"),
            "training": run.record.get("options"),
            "epochs_run": run.record.get("epochs_run"),
            "run_metrics": slim({k: v for k, v in run.metrics.items() if k in ("validation", "test")}),
            "parity_max_abs_diff": member.export.parity.max_abs_diff,
            "parity_images": member.export.parity.source,
            "fp32_bytes": member.export.size_bytes,
        }
        if member.int8 is not None and member.int8.chosen is not None:
            c = member.int8.chosen
            entry["int8"] = {
                "recipe": c.recipe.to_dict(),
                "max_prob_diff": c.max_prob_diff,
                "agreement": c.agreement,
                "meets_tolerance": member.int8.ok,
                "bytes": c.size_bytes,
                "latency_ms": {"fp32": member.int8.fp32_latency_ms, "int8": c.latency_ms},
                "recipes_tried": [t.recipe.name for t in member.int8.tried],
            }
        record["members"][member.name] = entry
    return record


def _link_folder(folder: Path, files: Sequence[Path]) -> Path:
    """A temporary folder of symlinks, so a file list can be passed where a folder is taken."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        (folder / f"{i:04d}_{f.name}").symlink_to(Path(f).resolve())
    return folder
