"""Which front door a user's models go through: run folders, one foreign Keras model, or one foreign ONNX."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from pneumoedge.export.bundle_builder import BundleOptions, BundleResult
from pneumoedge.export.errors import ExportError
from pneumoedge.export.foreign import export_foreign
from pneumoedge.export.onnx_export import ExportResult
from pneumoedge.export.onnx_wrap import WrapResult, export_onnx
from pneumoedge.export.pipeline import export_runs
from pneumoedge.export.report import Progress, quiet
from pneumoedge.export.training import is_run_dir
from pneumoedge.preprocessing import PreprocessSpec


@dataclass(frozen=True)
class Declared:
    """What the user declares about a model pneumoedge did not train (run folders carry their own)."""

    spec: Optional[PreprocessSpec]
    labels: Sequence[str]
    head: str
    threshold: float = 0.5


def export_models(
    models: Sequence[Union[str, Path]],
    out: Union[str, Path],
    options: BundleOptions,
    *,
    declared: Declared,
    weights: Optional[Sequence[float]] = None,
    progress: Progress = quiet,
) -> Union[BundleResult, ExportResult, WrapResult]:
    """Export run folders (an ensemble bundle) or ONE foreign model (.keras/.h5/SavedModel or .onnx).

    A foreign model's threshold is the declared one (`fixed:X`); run folders choose theirs on
    validation by `options.threshold`.
    """
    models = [Path(m) for m in models]
    runs = [m for m in models if is_run_dir(m)]
    if runs and len(runs) != len(models):
        raise ExportError("give either run folders (from `pneumoedge train`) or one foreign model, not a mix")
    if runs:
        return export_runs(runs, out, options, weights=weights, progress=progress)
    if len(models) != 1:
        raise ExportError("a foreign model is exported one at a time; for an ensemble, export each and train runs")
    model = models[0]
    onnx = model.suffix.lower() == ".onnx"
    if declared.spec is None:
        if onnx:
            raise ExportError(f"{model}: declare the preprocessing its training used, at least --size H W and --layout (see --help, docs/pytorch.md)")
        raise ExportError(f"{model} is not a pneumoedge run folder: declare its preprocessing, at least --size H W (see --help)")
    foreign = replace(options, threshold=f"fixed:{declared.threshold!r}")
    if onnx:
        return export_onnx(model, out, foreign, spec=declared.spec, labels=declared.labels, head=declared.head, progress=progress)
    if declared.spec.layout != "NHWC":
        raise ExportError(f"--layout {declared.spec.layout} is for a foreign .onnx file; a Keras model's input is NHWC")
    return export_foreign(model, out, foreign, spec=declared.spec, labels=declared.labels, head=declared.head, progress=progress)
