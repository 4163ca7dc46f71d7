"""Front doors for models pneumoedge did not train (spec declared): their shared rules, and the Keras one."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence, Union

from pneumoedge.bundle import MemberSource
from pneumoedge.export.bundle_builder import CALIBRATION_IMAGES, BuildState, BundleOptions, BundleResult, ExportedMember, build_bundle
from pneumoedge.export.errors import ExportError
from pneumoedge.export.ood_fit import reference_files
from pneumoedge.export.onnx_export import ExportResult, export_keras
from pneumoedge.export.report import Progress, quiet, report_export
from pneumoedge.export.tensors import image_files, load_tensors
from pneumoedge.preprocessing import PreprocessSpec


#: A foreign binary model's threshold when none is declared.
DECLARED_THRESHOLD = "fixed:0.5"


def declared_options(spec: PreprocessSpec, options: BundleOptions) -> BundleOptions:
    """What every door with a user-declared spec (a foreign Keras model, a wrapped ONNX) runs with.

    A foreign model must be fed the full decode its own training pipeline used, and its
    threshold is `DECLARED_THRESHOLD` unless one is given (it has no validation split).
    """
    if spec.decode_reduction != 1:
        # A reduced JPEG decode moves a foreign model's probabilities (by 0.17-0.33 on one real
        # model): only models trained through pneumoedge's own preprocessing may use it.
        raise ExportError(
            f"decode_reduction={spec.decode_reduction} is only for models trained by `pneumoedge train --decode-reduction`; "
            "a foreign model must be fed the full decode its training pipeline used"
        )
    return replace(options, threshold=options.threshold or DECLARED_THRESHOLD)


def single_file(out: Path, options: BundleOptions) -> bool:
    """True when `out` is one .onnx file (no bundle, so no int8)."""
    if out.suffix != ".onnx":
        return False
    if options.int8.enabled:
        raise ExportError("--int8 needs a bundle folder as --out (a bundle holds the fp32 and int8 members)")
    return True


def foreign_member(name: str, source: MemberSource, check: Any, options: BundleOptions) -> ExportedMember:
    """A foreign model's member: calibrated on --images when no --calibration; statistics on --reference."""
    folder = options.reference if options.reference is not None else options.int8.calibration
    files = reference_files(folder)
    images = options.images
    return ExportedMember(
        name, source, check,
        calibration=(lambda: load_tensors(image_files(images, limit=CALIBRATION_IMAGES), source.spec)) if images is not None else None,
        references=files, references_described=f"{{used}} images from {folder}",
    )


def foreign_provenance(state: BuildState, record: dict[str, Any]) -> dict[str, Any]:
    """A foreign model's provenance: what the door says, and the int8 search when there was one."""
    int8 = state.members[0].int8
    return {**record, **({"int8": int8.to_dict()} if int8 is not None else {})}


def export_foreign(
    model: Union[str, Path],
    out: Union[str, Path],
    options: BundleOptions = BundleOptions(),
    *,
    spec: PreprocessSpec,
    labels: Sequence[str],
    head: str,
    progress: Progress = quiet,
) -> BundleResult | ExportResult:
    """Export a Keras model pneumoedge did not train, with its spec declared.

    `out` ending in `.onnx` writes one self-describing ONNX file (no int8); otherwise a bundle
    folder with the model (and its int8 version when `options.int8.enabled`), through `build_bundle`.
    The threshold is `options.threshold` (the grammar; a foreign model has no validation split).
    """
    started = time.perf_counter()
    out = Path(out)
    options = declared_options(spec, options)
    keras = dict(spec=spec, labels=labels, head=head, images=options.images, tolerance=options.parity_tolerance,
                 heatmaps=options.heatmaps, heatmap_layer=options.heatmap_layer)
    if single_file(out, options):
        progress(f"exporting {model} to {out} (parity check)")
        return export_keras(model, out, **keras)
    name = options.name or Path(model).stem
    with tempfile.TemporaryDirectory(prefix="pneumoedge-export-") as tmp:
        progress(f"exporting {model} to ONNX (parity check)")
        result = export_keras(model, Path(tmp) / "model.onnx", **keras)
        report_export(result, progress)
        source = MemberSource(result.onnx_path, name, spec, "fp32", 1.0, result.card.activation, result.card.explain)
        record = {
            "created_by": "pneumoedge export (foreign model, spec declared by the user)",
            "source_model": str(model),
            "synthetic": False,
            "notice": "exported from a model pneumoedge did not train; its validation is the user's responsibility",
            "parity_max_abs_diff": result.parity.max_abs_diff,
        }
        return build_bundle(
            out, [foreign_member(name, source, result, options)], Path(tmp), labels=labels, task=result.card.task,
            options=options, describe=lambda state: foreign_provenance(state, record), progress=progress, started=started,
        )
