"""Run folders -> parity-checked ONNX (+ int8) -> one ensemble bundle (foreign models: foreign.py, demo: demo.py).

The ensemble's threshold is chosen on the ensemble's own validation probabilities (the runs'
recorded patient-level validation split, run through the exported fp32 ONNX members), not
copied from one member.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import MemberSource, write_bundle
from pneumoedge.export.demo import DEMO_ARCHS, DemoPlan, DemoResult, run_demo
from pneumoedge.export.errors import ExportError, QuantizationError
from pneumoedge.export.evaluation import DEFAULT_THRESHOLD_METHOD, choose_threshold, classification_metrics
from pneumoedge.export.foreign import export_foreign
from pneumoedge.export.int8_search import quantize_int8
from pneumoedge.export.onnx_export import (
    DEFAULT_PARITY_TOLERANCE,
    apply_activation,
    class_probabilities,
    export_keras,
    image_files,
    int8_heatmap_check,
    load_tensors,
    onnx_session,
    run_onnx,
)
from pneumoedge.export.ood_fit import pick as pick_references
from pneumoedge.export.ood_fit import with_ood
from pneumoedge.export.quantization import DEFAULT_RECIPE, Tolerance
from pneumoedge.export.report import (
    SYNTHETIC_NOTICE,
    BundleResult,
    MemberReport,
    Progress,
    _provenance,
    _quiet,
    _slim,
    write_report_json,
)
from pneumoedge.export.training import Run, read_run

# Callers (commands/, scripts/, tests) import these from here; they live in foreign, demo, report.
__all__ = [
    "DEMO_ARCHS", "SYNTHETIC_NOTICE", "BundleResult", "DemoPlan", "DemoResult", "MemberReport", "Progress",
    "export_foreign", "export_runs", "run_demo", "write_report_json", "_provenance", "_slim",
]

log = logging.getLogger(__name__)


def _ensemble_probs(paths: Sequence[Path], weights: Sequence[float], activations: Sequence[str], tensors: Sequence[np.ndarray]) -> np.ndarray:
    total = None
    for path, weight, activation, x in zip(paths, weights, activations, tensors):
        p = class_probabilities(apply_activation(run_onnx(onnx_session(path, threads=2), x), activation)) * weight
        total = p if total is None else total + p
    return total / float(sum(weights))


def _validation_files(runs: Sequence[Run]) -> tuple[list[Path], np.ndarray]:
    """Files in every run's recorded validation split (the same split when data and seed match)."""
    labels = runs[0].labels
    common: Optional[dict[str, str]] = None
    for run in runs:
        val = {entry["path"]: entry["target"] for entry in run.split()["val"]}
        common = val if common is None else {p: t for p, t in common.items() if p in val}
    files = sorted(p for p in (common or {}) if Path(p).is_file())
    return [Path(p) for p in files], np.array([labels.index(common[p]) for p in files], dtype=int)


def export_runs(
    run_dirs: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    *,
    weights: Optional[Sequence[float]] = None,
    int8: bool = False,
    calibration: Optional[Union[str, Path]] = None,
    images: Optional[Union[str, Path]] = None,
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
    int8_tolerance: Tolerance = Tolerance(),
    recipe: str = DEFAULT_RECIPE,
    calibrate_method: Optional[str] = None,
    search: bool = True,
    int8_budget: float = 180.0,
    on_fail: str = "warn",
    threshold_method: Optional[str] = None,
    name: Optional[str] = None,
    provenance: Optional[dict[str, Any]] = None,
    heatmaps: bool = True,
    heatmap_layer: Optional[str] = None,
    ood: bool = True,
    progress: Progress = _quiet,
) -> BundleResult:
    """Export trained runs to one ensemble bundle, parity-checked, optionally with int8 members.

    Args:
        run_dirs: run folders from `train` (same task and labels).
        out_dir: the bundle folder.
        weights: one per run (default equal).
        int8: also quantize each member; calibration images come from `calibration` (a folder)
            or else from each run's recorded training split.
        images: folder for the parity check (default: the runs' validation images).
        int8_tolerance: what int8 must keep; `on_fail` "warn" keeps fp32 as the default
            precision when int8 misses it, "refuse" raises.
        threshold_method: default: the first run's method (target sensitivity 0.95).

    Returns:
        BundleResult; the manifest's default precision is "int8" only when every int8 member
        met the tolerance.
    """
    started = time.perf_counter()
    steps: dict[str, float] = {}
    runs = [read_run(d) for d in run_dirs]
    if not runs:
        raise ExportError("give at least one run folder")
    labels, task = runs[0].labels, runs[0].task
    for run in runs[1:]:
        if run.labels != labels or run.task != task:
            raise ExportError(f"{run.run_dir}: task/labels {run.task}/{list(run.labels)} differ from {runs[0].run_dir}'s {task}/{list(labels)}")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs) or any(w <= 0 for w in weights):
        raise ExportError(f"give one positive weight per model ({len(runs)}), got {list(weights)}")
    method = threshold_method or runs[0].record.get("options", {}).get("threshold_method", DEFAULT_THRESHOLD_METHOD)
    val_files, y_val = _validation_files(runs)
    out = Path(out_dir)

    members: list[MemberReport] = []
    sources: list[MemberSource] = []
    with tempfile.TemporaryDirectory(prefix="pneumoedge-export-") as tmp:
        work = Path(tmp)
        for run, member_name, weight in zip(runs, names, weights):
            t = time.perf_counter()
            progress(f"exporting {member_name} to ONNX (parity check)")
            parity_dir = images
            if parity_dir is None and val_files:
                parity_dir = _link_folder(work / f"parity_{member_name}", val_files[:32])
            result = export_keras(
                run.run_dir, work / f"{member_name}.fp32.onnx", spec=run.spec, labels=labels,
                head=run.record.get("head", "sigmoid"), images=parity_dir, tolerance=parity_tolerance,
                heatmaps=heatmaps, heatmap_layer=heatmap_layer,
            )
            steps[f"export {member_name}"] = time.perf_counter() - t
            progress(f"  parity max |p_keras - p_onnx| = {result.parity.max_abs_diff:.2e} on {result.parity.source}")
            members.append(MemberReport(member_name, result, weight))
            sources.append(MemberSource(result.onnx_path, member_name, run.spec, "fp32", weight, result.card.activation, result.card.explain))
            if result.heatmap is not None:
                progress(f"  heatmaps at {result.heatmap.layer}: min Pearson r vs TensorFlow Grad-CAM {result.heatmap.min_correlation:.6f}")
            elif result.heatmap_note:
                progress(f"  {result.heatmap_note}")

        threshold_info = None
        metrics: dict[str, Any] = {}
        fp32_paths = [m.export.onnx_path for m in members]
        activations = [m.export.card.activation for m in members]
        val_tensors = [load_tensors(val_files, run.spec) for run in runs] if val_files else []
        if val_files:
            p_val = _ensemble_probs(fp32_paths, weights, activations, val_tensors)
            if task == "binary":
                threshold_info = choose_threshold(y_val, p_val[:, 1], method)
            metrics["validation_fp32"] = classification_metrics(y_val, p_val, labels, threshold_info["threshold"] if threshold_info else None)
        elif task == "binary":
            values = [r.threshold for r in runs if r.threshold is not None]
            threshold_info = {"threshold": float(np.mean(values)) if values else 0.5, "method": "members", "description": "mean of the members' validation thresholds (no shared validation split)"}
        threshold = threshold_info["threshold"] if threshold_info else None

        int8_ok = False
        if int8:
            int8_ok = True
            for run, member, source in zip(runs, members, list(sources)):
                t = time.perf_counter()
                progress(f"quantizing {member.name} to int8 (calibration, recipe search if needed)")
                if calibration is not None:
                    calib = load_tensors(image_files(calibration, limit=64), run.spec)
                else:
                    train_files = [Path(e["path"]) for e in run.split()["train"]]
                    picks = np.linspace(0, len(train_files) - 1, min(64, len(train_files))).round().astype(int)
                    calib = load_tensors([train_files[i] for i in sorted(set(picks.tolist()))], run.spec)
                x_eval = val_tensors[runs.index(run)] if val_files else None
                try:
                    q = quantize_int8(
                        member.export.onnx_path, work / f"{member.name}.int8.onnx", calib,
                        eval_tensors=x_eval, y_true=y_val if val_files else None, threshold=threshold,
                        tolerance=int8_tolerance, recipe=recipe, calibrate_method=calibrate_method,
                        search=search, budget_s=int8_budget, on_fail=on_fail,
                    )
                except QuantizationError as exc:
                    raise QuantizationError(f"{member.name}: {exc}") from None
                steps[f"int8 {member.name}"] = time.perf_counter() - t
                member.int8 = q
                int8_ok = int8_ok and q.ok
                c = q.chosen
                progress(
                    f"  int8 recipe {c.recipe.name}: max diff {c.max_prob_diff:.4f}, agreement {c.agreement:.3f}, "
                    f"{q.fp32_size_bytes / 1024:.0f} KB -> {c.size_bytes / 1024:.0f} KB, {q.fp32_latency_ms:.2f} -> {c.latency_ms:.2f} ms"
                    + ("" if q.ok else "  [MISSES TOLERANCE]")
                )
                for warning in q.warnings:
                    progress(f"  warning: {warning}")
                explain = member.export.card.explain
                if explain:
                    check = int8_heatmap_check(member.export.onnx_path, q.int8_path, x_eval if x_eval is not None else calib)
                    explain = {**explain, "int8_check": check}
                    progress(f"  int8 heatmaps vs fp32: min Pearson r {check['min_correlation']:.4f}; maps from the {check['heatmap_from']} graph")
                sources.append(MemberSource(q.int8_path, member.name, run.spec, "int8", member.weight, member.export.card.activation, explain))
            if val_files:
                p_int8 = _ensemble_probs([m.int8.int8_path for m in members], weights, activations, val_tensors)
                metrics["validation_int8"] = classification_metrics(y_val, p_int8, labels, threshold)
                p_fp32 = _ensemble_probs(fp32_paths, weights, activations, val_tensors)
                metrics["int8_vs_fp32"] = {
                    "max_prob_diff": float(np.abs(p_int8 - p_fp32).max()),
                    "agreement": float((_decide(p_int8, threshold) == _decide(p_fp32, threshold)).mean()),
                    "images": len(val_files),
                }
                ensemble_check = metrics["int8_vs_fp32"]
                if ensemble_check["max_prob_diff"] > int8_tolerance.max_prob_diff or ensemble_check["agreement"] < int8_tolerance.min_agreement:
                    int8_ok = False
                    progress(
                        f"  warning: the int8 ensemble agrees with fp32 on {ensemble_check['agreement']:.1%} of validation labels "
                        f"(max diff {ensemble_check['max_prob_diff']:.4f}); fp32 stays the default precision"
                    )

        ood_summary: dict[str, Any] = {}
        if ood:
            sources = _fit_ood(runs, [m.name for m in members], sources, work, ood_summary, progress)
        record = _provenance(runs, members, metrics, threshold_info, provenance)
        if ood_summary:
            record["out_of_distribution"] = ood_summary
        manifest = write_bundle(
            out, sources, labels=labels, task=task, threshold=threshold,
            threshold_method=threshold_info["description"] if threshold_info else "argmax (multiclass)",
            provenance=record, name=name or out.name, default_precision="int8" if int8 and int8_ok else "fp32",
        )
    return BundleResult(out, manifest, members, threshold_info, metrics, time.perf_counter() - started, steps)


def _fit_ood(
    runs: Sequence[Run], names: Sequence[str], sources: list[MemberSource], work: Path, summary: dict[str, Any], progress: Progress
) -> list[MemberSource]:
    """Each run's members (fp32 and int8) with statistics fitted on the run's training images."""
    fitted: dict[tuple[str, str], MemberSource] = {}
    for run, name in zip(runs, names):
        files = [Path(e["path"]) for e in run.split()["train"] if Path(e["path"]).is_file()]
        own = [s for s in sources if s.name == name]
        if len(files) < 10:
            summary[name] = {"available": False, "reason": f"only {len(files)} training images found on disk"}
            continue
        used = len(pick_references(files))
        progress(f"fitting {name}'s out-of-distribution statistics on {used} of its training images")
        own, summary[name] = with_ood(own, files, work, described=f"{used} training images of run {run.run_dir.name}")
        for source in own:
            fitted[(source.name, source.precision)] = source
        for precision in ("fp32", "int8"):
            meta = summary[name].get(precision)
            if isinstance(meta, dict) and meta.get("threshold"):
                progress(f"  {precision}: threshold {meta['threshold']:.3g} (99th percentile of {meta['heldout_images']} held-out images), shrinkage {meta['shrinkage']:.3f}")
    return [fitted.get((s.name, s.precision), s) for s in sources]


def _decide(probs: np.ndarray, threshold: Optional[float]) -> np.ndarray:
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def _link_folder(folder: Path, files: Sequence[Path]) -> Path:
    """A temporary folder of symlinks, so a file list can be passed where a folder is taken."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        (folder / f"{i:04d}_{f.name}").symlink_to(Path(f).resolve())
    return folder
