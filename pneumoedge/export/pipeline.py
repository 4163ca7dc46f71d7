"""Chains of steps: run folders -> parity-checked ONNX (+ int8) -> one ensemble bundle; a foreign
Keras model -> a bundle or a self-describing .onnx; and the end-to-end demo on phantoms.

The ensemble's threshold is chosen on the ensemble's own validation probabilities (the runs'
recorded patient-level validation split, run through the exported fp32 ONNX members), not
copied from one member.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import Manifest, MemberSource, write_bundle
from pneumoedge.export.errors import ExportError, QuantizationError
from pneumoedge.export.evaluation import DEFAULT_THRESHOLD_METHOD, choose_threshold, classification_metrics
from pneumoedge.export.onnx_export import (
    DEFAULT_PARITY_TOLERANCE,
    ExportResult,
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
from pneumoedge.export.ood_fit import reference_files, with_ood
from pneumoedge.export.quantization import DEFAULT_RECIPE, QuantizationResult, Tolerance, quantize_int8
from pneumoedge.export.training import Run, read_run
from pneumoedge.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

SYNTHETIC_NOTICE = "synthetic phantoms; demonstration only; NOT clinically validated; not for diagnosis"
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class MemberReport:
    name: str
    export: ExportResult
    weight: float
    int8: Optional[QuantizationResult] = None

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "weight": self.weight, "export": self.export.to_dict()}
        if self.int8 is not None:
            data["int8"] = self.int8.to_dict()
        return data


@dataclass
class BundleResult:
    bundle_dir: Path
    manifest: Manifest
    members: list[MemberReport]
    threshold: Optional[dict[str, Any]]
    metrics: dict[str, Any]
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle_dir),
            "default_precision": self.manifest.default_precision,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "members": [m.to_dict() for m in self.members],
            "seconds": round(self.seconds, 1),
            "steps": {k: round(v, 2) for k, v in self.steps.items()},
        }


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
                        search=search, on_fail=on_fail,
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


def _provenance(runs: Sequence[Run], members: Sequence[MemberReport], metrics: dict[str, Any], threshold: Optional[dict[str, Any]], extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    data_records = [run.record.get("provenance", {}) for run in runs]
    synthetic = any(r.get("synthetic") for r in data_records)
    record: dict[str, Any] = {
        "created_by": "pneumoedge export",
        "synthetic": synthetic,
        "notice": SYNTHETIC_NOTICE if synthetic else "trained by the user; validate clinically before any use",
        "data": sorted({r.get("data", "?") for r in data_records}),
        "threshold": threshold,
        "metrics": _slim(metrics),
        "members": {},
    }
    for run, member in zip(runs, members):
        entry = {
            "arch": run.record.get("arch"),
            "parameters": run.record.get("parameters"),
            "training": run.record.get("options"),
            "epochs_run": run.record.get("epochs_run"),
            "run_metrics": _slim({k: v for k, v in run.metrics.items() if k in ("validation", "test")}),
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
    record.update(extra or {})
    return record


def _slim(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the bulky parts, for the manifest."""
    keep = ("images", "accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "macro_f1", "confusion_matrix", "max_prob_diff", "agreement")
    return {k: ({kk: vv for kk, vv in v.items() if kk in keep} if isinstance(v, dict) else v) for k, v in metrics.items()}


def export_foreign(
    model: Union[str, Path],
    out: Union[str, Path],
    *,
    spec: PreprocessSpec,
    labels: Sequence[str],
    head: str,
    images: Optional[Union[str, Path]] = None,
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
    int8: bool = False,
    calibration: Optional[Union[str, Path]] = None,
    int8_tolerance: Tolerance = Tolerance(),
    recipe: str = DEFAULT_RECIPE,
    calibrate_method: Optional[str] = None,
    on_fail: str = "warn",
    threshold: float = 0.5,
    name: Optional[str] = None,
    heatmaps: bool = True,
    heatmap_layer: Optional[str] = None,
    reference: Optional[Union[str, Path]] = None,
    progress: Progress = _quiet,
) -> BundleResult | ExportResult:
    """Export a Keras model pneumoedge did not train, with its spec declared.

    `out` ending in `.onnx` writes one self-describing ONNX file (no int8); otherwise a bundle
    folder with the model (and its int8 version when asked).
    """
    started = time.perf_counter()
    out = Path(out)
    if spec.decode_reduction != 1:
        # A reduced JPEG decode moves a foreign model's probabilities (by 0.17-0.33 on one real
        # model): only models trained through pneumoedge's own preprocessing may use it.
        raise ExportError(
            f"decode_reduction={spec.decode_reduction} is only for models trained by `pneumoedge train --decode-reduction`; "
            "a foreign model must be fed the full decode its training pipeline used"
        )
    if out.suffix == ".onnx":
        if int8:
            raise ExportError("--int8 needs a bundle folder as --out (a bundle holds the fp32 and int8 members)")
        progress(f"exporting {model} to {out} (parity check)")
        return export_keras(
            model, out, spec=spec, labels=labels, head=head, images=images, tolerance=parity_tolerance,
            heatmaps=heatmaps, heatmap_layer=heatmap_layer,
        )
    member_name = name or Path(model).stem
    with tempfile.TemporaryDirectory(prefix="pneumoedge-export-") as tmp:
        progress(f"exporting {model} to ONNX (parity check)")
        result = export_keras(
            model, Path(tmp) / "model.onnx", spec=spec, labels=labels, head=head, images=images, tolerance=parity_tolerance,
            heatmaps=heatmaps, heatmap_layer=heatmap_layer,
        )
        progress(f"  parity max |p_keras - p_onnx| = {result.parity.max_abs_diff:.2e} on {result.parity.source}")
        if result.heatmap is not None:
            progress(f"  heatmaps at {result.heatmap.layer}: min Pearson r vs TensorFlow Grad-CAM {result.heatmap.min_correlation:.6f}")
        elif result.heatmap_note:
            progress(f"  {result.heatmap_note}")
        member = MemberReport(member_name, result, 1.0)
        sources = [MemberSource(result.onnx_path, member_name, spec, "fp32", 1.0, result.card.activation, result.card.explain)]
        if int8:
            source = calibration or images
            if source is None:
                raise ExportError("--int8 needs --calibration DIR (real images, preprocessed with the declared spec)")
            progress("quantizing to int8")
            calib = load_tensors(image_files(source, limit=64), spec)
            q = quantize_int8(result.onnx_path, Path(tmp) / "model.int8.onnx", calib, threshold=threshold, tolerance=int8_tolerance, recipe=recipe, calibrate_method=calibrate_method, on_fail=on_fail)
            member.int8 = q
            explain = result.card.explain
            if explain:
                explain = {**explain, "int8_check": int8_heatmap_check(result.onnx_path, q.int8_path, calib)}
            sources.append(MemberSource(q.int8_path, member_name, spec, "int8", 1.0, result.card.activation, explain))
        reference = reference if reference is not None else calibration
        ood_summary: dict[str, Any] = {"available": False, "reason": "no --reference (or --calibration) folder given"}
        if reference is not None:
            files = reference_files(reference)
            progress(f"fitting out-of-distribution statistics on {len(files)} images from {reference}")
            sources, ood_summary = with_ood(sources, files, Path(tmp), described=f"{len(files)} images from {reference}")
        record = {
            "out_of_distribution": ood_summary,
            "created_by": "pneumoedge export (foreign model, spec declared by the user)",
            "source_model": str(model),
            "synthetic": False,
            "notice": "exported from a model pneumoedge did not train; its validation is the user's responsibility",
            "parity_max_abs_diff": result.parity.max_abs_diff,
        }
        if member.int8 is not None:
            record["int8"] = member.int8.to_dict()
        manifest = write_bundle(
            out, sources, labels=labels, task=result.card.task, threshold=threshold if result.card.task == "binary" else None,
            threshold_method=f"declared {threshold}" if result.card.task == "binary" else "argmax (multiclass)",
            provenance=record, name=name or out.name,
            default_precision="int8" if member.int8 is not None and member.int8.ok else "fp32",
        )
    return BundleResult(out, manifest, [member], None, {}, time.perf_counter() - started)


def write_report_json(path: Union[str, Path], data: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# the demo: every step on generated data


DEMO_ARCHS = ("cnn3_gray150", "cnn4_gray256")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run: `quick` is for tests and CI (tiny images, 2 epochs)."""

    counts: dict[str, dict[str, int]]
    image_size: Any
    input_size: Optional[tuple[int, int]]
    epochs: int
    patience: int
    batch_size: int
    examples: int
    #: The full demo trains as the default bundle does: X-ray-sized phantoms decoded at 1/4.
    decode_reduction: int = 1
    lr_schedule: str = "plateau"

    @classmethod
    def make(cls, quick: bool) -> "DemoPlan":
        if quick:
            return cls({"train": {"normal": 24, "bacteria": 12, "virus": 12}, "test": {"normal": 8, "bacteria": 4, "virus": 4}},
                       (96, 96), (64, 64), 2, 2, 16, 4)
        return cls({"train": {"normal": 240, "bacteria": 120, "virus": 120}, "test": {"normal": 60, "bacteria": 30, "virus": 30}},
                   ((1024, 1600), (1024, 1600)), None, 10, 10, 16, 8, decode_reduction=4, lr_schedule="cosine")


@dataclass
class DemoResult:
    out_dir: Path
    steps: dict[str, float]
    artefacts: dict[str, str]
    bundle: BundleResult
    evaluations: dict[str, dict[str, Any]]
    predictions: list[dict[str, Any]]


def run_demo(
    out_dir: Union[str, Path],
    *,
    quick: bool = False,
    archs: Sequence[str] = DEMO_ARCHS,
    seed: int = 0,
    progress: Progress = _quiet,
) -> DemoResult:
    """Generate phantoms, train two architectures, evaluate, export with parity, int8, bundle, infer.

    Everything is written under `out_dir` (data/, runs/, evaluation/, bundle/, examples/,
    demo_report.json). The models are trained on synthetic phantoms: demonstration only.
    """
    import pneumoedge
    from pneumoedge.datasets import phantoms
    from pneumoedge.export.evaluation import evaluate_model, evaluate_run
    from pneumoedge.export.training import train

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; the demo writes into a new or empty folder")
    plan = DemoPlan.make(quick)
    steps: dict[str, float] = {}
    artefacts: dict[str, str] = {}

    def step(name: str) -> Callable[[], None]:
        started = time.perf_counter()
        progress(f"[{len(steps) + 1}] {name}")

        def done() -> None:
            steps[name] = time.perf_counter() - started
            progress(f"    done in {steps[name]:.1f} s")

        return done

    done = step("generate synthetic phantoms (Kaggle layout)")
    data = phantoms.generate_dataset(out / "data", counts=plan.counts, size=plan.image_size, seed=seed, sixteen_bit_fraction=0.1)
    artefacts["data"] = str(data)
    done()

    run_dirs = []
    for arch in archs:
        done = step(f"train {arch}")
        result = train(
            data, arch, out / "runs" / arch, epochs=plan.epochs, batch_size=plan.batch_size, seed=seed,
            size=plan.input_size, patience=plan.patience, decode_reduction=plan.decode_reduction, lr_schedule=plan.lr_schedule,
            on_epoch=lambda e, n, logs: progress(f"    epoch {e}/{n}: loss {logs.get('loss', 0):.3f}, val_loss {logs.get('val_loss', 0):.3f}, val_acc {logs.get('val_accuracy', 0):.3f}"),
        )
        run_dirs.append(result.run_dir)
        artefacts[f"run {arch}"] = str(result.run_dir)
        done()

    evaluations: dict[str, dict[str, Any]] = {}
    done = step("evaluate the Keras runs on the test split")
    for run_dir in run_dirs:
        metrics = evaluate_run(run_dir, data / "test", out / "evaluation" / f"keras_{run_dir.name}")
        evaluations[f"keras {run_dir.name}"] = metrics
        progress(f"    {run_dir.name}: accuracy {metrics['accuracy']:.3f}, ROC AUC {metrics['roc_auc'] or float('nan'):.3f}")
    artefacts["evaluation"] = str(out / "evaluation")
    done()

    done = step("export to ONNX with parity, int8 with accuracy check, bundle")
    bundle = export_runs(run_dirs, out / "bundle", int8=True, on_fail="warn", name="demo", progress=progress)
    artefacts["bundle"] = str(bundle.bundle_dir)
    done()

    done = step("evaluate the bundle with the runtime (fp32 and int8)")
    for precision in ("fp32", "int8"):
        metrics = evaluate_model(bundle.bundle_dir, data / "test", out / "evaluation" / f"bundle_{precision}", precision=precision)
        evaluations[f"bundle {precision}"] = metrics
        progress(f"    bundle {precision}: accuracy {metrics['accuracy']:.3f}, ROC AUC {metrics['roc_auc'] or float('nan'):.3f}")
    done()

    done = step("run the runtime on example images")
    if quick:
        examples = phantoms.write_examples(out / "examples", n=plan.examples, seed=seed + 7, size=plan.image_size, png_size=None)
    else:
        examples = phantoms.write_examples(out / "examples", n=plan.examples, seed=seed + 7)
    artefacts["examples"] = str(out / "examples")
    ensemble = pneumoedge.load(bundle.bundle_dir)
    predictions = [p.to_dict() for p in ensemble.predict_many(examples)]
    for p in predictions:
        progress(f"    {Path(p['path']).name}: {p['label']} (p={p['probability']:.3f})")
    done()

    report = {
        "notice": SYNTHETIC_NOTICE,
        "quick": quick,
        "steps_seconds": {k: round(v, 2) for k, v in steps.items()},
        "artefacts": artefacts,
        "evaluations": {k: {kk: v.get(kk) for kk in ("accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "images")} for k, v in evaluations.items()},
        "bundle": bundle.report(),
        "predictions": predictions,
    }
    artefacts["report"] = str(write_report_json(out / "demo_report.json", report))
    return DemoResult(out, steps, artefacts, bundle, evaluations, predictions)
