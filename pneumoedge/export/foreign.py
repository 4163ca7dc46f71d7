"""A Keras model pneumoedge did not train, with its spec declared -> a bundle or one self-describing .onnx."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from pneumoedge.bundle import MemberSource, write_bundle
from pneumoedge.export.errors import ExportError
from pneumoedge.export.int8_search import quantize_int8
from pneumoedge.export.onnx_export import (
    DEFAULT_PARITY_TOLERANCE,
    ExportResult,
    export_keras,
    image_files,
    int8_heatmap_check,
    load_tensors,
)
from pneumoedge.export.ood_fit import reference_files, with_ood
from pneumoedge.export.quantization import DEFAULT_RECIPE, Tolerance
from pneumoedge.export.report import BundleResult, MemberReport, Progress, _quiet
from pneumoedge.preprocessing import PreprocessSpec


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
    int8_budget: float = 180.0,
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
            q = quantize_int8(result.onnx_path, Path(tmp) / "model.int8.onnx", calib, threshold=threshold, tolerance=int8_tolerance, recipe=recipe, calibrate_method=calibrate_method, on_fail=on_fail, budget_s=int8_budget)
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
