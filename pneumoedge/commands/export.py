"""`pneumoedge export`: Keras -> parity-checked ONNX (+ int8) in a bundle; runs or foreign models."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, parse_floats, parse_names, parse_scale, user_errors
from pneumoedge.export.bundle_builder import BundleOptions, BundleResult, Int8Options
from pneumoedge.export.onnx_export import DEFAULT_PARITY_TOLERANCE, ExportResult
from pneumoedge.export.onnx_wrap import WrapResult
from pneumoedge.int8_tolerance import INT8_MAX_PROB_DIFF, INT8_MIN_AGREEMENT, Tolerance
from pneumoedge.export.report import write_report_json
from pneumoedge.preprocessing import PreprocessSpec


# Long only by its signature: each parameter is one of the verb's documented options (kept as they were);
# the body parses them into BundleOptions, makes one call (export_models) and prints.
def export_command(
    models: Annotated[List[Path], typer.Argument(help="Run folders from `train` (one bundle, an ensemble when several), or ONE foreign .keras/.h5 file, SavedModel folder or .onnx file (PyTorch or any framework: wrapped unchanged, see docs/pytorch.md).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write (or, for a foreign model, a single .onnx file).", show_default=False)],
    weights: Annotated[Optional[str], typer.Option(help="Ensemble weights, comma-separated, one per run (default equal).", show_default=False)] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write int8 members (static quantization; the fastest recipe that meets the tolerance), checked against fp32.")] = False,
    calibration: Annotated[Optional[Path], typer.Option(help="Folder of images for int8 calibration (default: the runs' training images).", show_default=False)] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of images for the parity check (default: validation images, or generated phantoms).", show_default=False)] = None,
    tolerance: Annotated[float, typer.Option(help="Largest accepted |p_keras - p_onnx|; export refuses beyond it.")] = DEFAULT_PARITY_TOLERANCE,
    int8_max_diff: Annotated[float, typer.Option(help="int8: largest accepted |p_int8 - p_fp32|.")] = INT8_MAX_PROB_DIFF,
    int8_min_agreement: Annotated[float, typer.Option(help="int8: smallest accepted share of labels equal to fp32's.")] = INT8_MIN_AGREEMENT,
    recipe: Annotated[str, typer.Option(help="First int8 recipe (see pneumoedge.export.quantization.RECIPES): u8s8 (QDQ per-channel), u8s8_reduce_range, u8s8_per_tensor, u8u8, s8s8, qop_u8s8_reduce_range, qop_u8s8_per_tensor, qop_u8u8_reduce_range, u8s8_entropy, u8s8_percentile, u8u8_percentile.")] = "u8s8",
    calibration_method: Annotated[Optional[str], typer.Option(help="Override the recipe's calibration: minmax, entropy or percentile.", show_default=False)] = None,
    no_search: Annotated[bool, typer.Option("--no-search", help="Do not try other int8 recipes when the first misses the tolerance.")] = False,
    int8_budget: Annotated[Optional[float], typer.Option(min=1, help="Optional wall-clock cap in seconds on the int8 search (default: none). The search's work is counted in trials, so the same model and images give the same int8 file on any machine; a cap that stops it early says so in the report.")] = None,
    strict_int8: Annotated[bool, typer.Option("--strict-int8", help="Fail when no int8 recipe meets the tolerance (default: keep fp32 as the default precision and warn).")] = False,
    threshold_method: Annotated[Optional[str], typer.Option(help="Ensemble threshold on validation: sensitivity:0.95, youden or fixed:X.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default: the folder name).", show_default=False)] = None,
    size: Annotated[Optional[Tuple[int, int]], typer.Option(help="Foreign model: input size, --size H W.", show_default=False)] = None,
    color: Annotated[str, typer.Option(help="Foreign model: gray or rgb (gray files are expanded to RGB).")] = "gray",
    resize: Annotated[str, typer.Option(help="Foreign model: nearest (cv2), nearest_exact (PIL/Keras load_img nearest), bilinear (tf.image.resize / PIL bilinear upscaling), area, bicubic, lanczos. See docs/preprocessing.md.")] = "bilinear",
    scale: Annotated[str, typer.Option(help="Foreign model: multiply pixels (0..255) by this; a number or a fraction like 1/255.")] = "1/255",
    offset: Annotated[float, typer.Option(help="Foreign model: then add this.")] = 0.0,
    mean: Annotated[Optional[str], typer.Option(help="Foreign model: per-channel mean to subtract after scaling, e.g. 0.485,0.456,0.406.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option(help="Foreign model: per-channel std to divide by, e.g. 0.229,0.224,0.225.", show_default=False)] = None,
    high_bit_depth: Annotated[str, typer.Option(help="Foreign model: 16-bit pixels to 0..255 by min_max or full_range.")] = "min_max",
    dicom_voi: Annotated[str, typer.Option(help="Foreign model: DICOM grey levels by the file's own VOI LUT/window (file) or by min_max. See docs/inputs.md.")] = "file",
    layout: Annotated[str, typer.Option(help="Foreign .onnx model: input layout, NCHW (PyTorch) or NHWC (Keras/TensorFlow).", case_sensitive=False)] = "NHWC",
    heatmap: Annotated[bool, typer.Option(help="Add Grad-CAM heatmap outputs to each graph (checked against TensorFlow's GradientTape Grad-CAM; for a foreign .onnx, when the head is global-average-pool + linear). Without them, explain/--heatmaps say 'not available'.")] = True,
    heatmap_layer: Annotated[Optional[str], typer.Option(help="Keras models: the feature layer to explain, by name (also inside a nested backbone). Default: the last layer with a 4-D output.", show_default=False)] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Foreign model (Keras or ONNX): folder of images like its training data, for the out-of-distribution statistics (default: --calibration). Run folders use their own training images.", show_default=False)] = None,
    labels: Annotated[str, typer.Option(help="Foreign model: label names in output order, comma-separated.")] = "NORMAL,PNEUMONIA",
    head: Annotated[str, typer.Option(help="Foreign model: sigmoid (1 unit, p of the 2nd label), softmax (N units), or logits (raw; sigmoid/softmax applied by the runtime).")] = "sigmoid",
    threshold: Annotated[float, typer.Option(help="Foreign binary model: decision threshold to record.")] = 0.5,
) -> None:
    """Export Keras models to ONNX (opset 17, dynamic batch, spec in metadata), prove parity, bundle them.

    Each graph also gets Grad-CAM heatmap outputs, checked against TensorFlow's GradientTape
    (refused below Pearson r 0.99), and each bundle member out-of-distribution statistics from
    its training images (--reference for a foreign model).

    Run folders carry their own spec. A model pneumoedge did not train needs its preprocessing
    declared (--size, --color, --resize, --scale, --offset/--mean/--std, --labels, --head) so
    that the runtime reproduces what its training pipeline did.
    """
    console = Console()
    with user_errors():
        from pneumoedge.export.front_doors import Declared, export_models

        spec = None
        if size:
            spec = PreprocessSpec(
                height=size[0], width=size[1], color=color, resize=resize, scale=parse_scale(scale), offset=offset,
                mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), high_bit_depth=high_bit_depth,
                dicom_voi=dicom_voi, layout=layout.upper(),
            )
        options = BundleOptions(
            int8=Int8Options(
                enabled=int8, tolerance=Tolerance(max_prob_diff=int8_max_diff, min_agreement=int8_min_agreement),
                recipe=recipe, calibrate_method=calibration_method, search=not no_search, budget_s=int8_budget,
                on_fail="refuse" if strict_int8 else "warn", calibration=calibration,
            ),
            parity_tolerance=tolerance, images=images, heatmaps=heatmap, heatmap_layer=heatmap_layer,
            reference=reference, threshold=threshold_method, name=name,
        )
        result = export_models(
            models, out, options, declared=Declared(spec, parse_names(labels), head, threshold),
            weights=list(parse_floats(weights, "--weights")) if weights else None,
            progress=lambda message: console.print(message, highlight=False),
        )
        report = write_report_json(Path(out).with_name(Path(out).name + ".export-report.json"), result.report()) \
            if isinstance(result, BundleResult) else None
    wrapped = result.members[0].export if isinstance(result, BundleResult) else result
    if isinstance(wrapped, WrapResult):
        _print_wrapped(console, wrapped, result if isinstance(result, BundleResult) else None)
    elif isinstance(result, ExportResult):
        console.print(f"wrote [bold]{result.onnx_path}[/] ({result.size_bytes / 1024:.0f} KB, {result.nodes} nodes); "
                      f"parity max |p_keras - p_onnx| = {result.parity.max_abs_diff:.2e} on {result.parity.source}")
    else:
        _print_bundle(console, result, report)


def _print_bundle(console: Console, result: BundleResult, report: Path) -> None:
    """The members of a new bundle with their parity and int8 checks, the threshold and the metrics."""
    table = Table(title=f"bundle {result.bundle_dir} (default precision {result.manifest.default_precision})", title_justify="left")
    for column in ("member", "precision", "file", "KB", "parity / int8 check"):
        table.add_column(column)
    reports = {m.name: m for m in result.members}
    for member in result.manifest.members:
        r = reports.get(member.name)
        if member.precision == "fp32":
            check = f"max |p_keras - p_onnx| {r.export.parity.max_abs_diff:.1e}" if r else ""
        else:
            c = r.int8.chosen if r and r.int8 else None
            check = f"{c.recipe.name}: max diff {c.max_prob_diff:.4f}, agreement {c.agreement:.3f}, {c.latency_ms:.2f} ms" if c else ""
        table.add_row(member.name, member.precision, member.file, f"{member.path.stat().st_size / 1024:.0f}", check)
    console.print(table)
    if result.threshold:
        console.print(f"threshold {result.threshold['threshold']:.4f}: {result.threshold['description']}")
    for key in ("validation_fp32", "validation_int8"):
        m = result.metrics.get(key)
        if m:
            console.print(f"{key}: accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 3)}")
    console.print(f"report: {report}")


def _print_wrapped(console: Console, result: WrapResult, bundle: Optional[BundleResult]) -> None:
    """A wrapped foreign .onnx: the equality evidence, the int8 choice, a few files' probabilities."""
    eq = result.equality
    console.print(f"wrapped [bold]{result.source}[/] (opset {result.opset}, batch {'fixed 1' if result.fixed_batch else 'dynamic'}): "
                  f"graph unchanged except metadata{' and heatmap outputs' if result.explain else ''} ({eq['graph_unchanged']}); "
                  f"output identical bit for bit on {eq['tensors']} tensors ({eq['identical']}, {eq['source']})", highlight=False)
    console.print(result.heatmap_note, highlight=False)
    quantized = bundle.members[0].int8 if bundle is not None else None
    if quantized is not None and quantized.chosen is not None:
        c = quantized.chosen
        console.print(f"int8: {c.recipe.name}: max diff {c.max_prob_diff:.4f}, agreement {c.agreement:.3f}, {c.latency_ms:.2f} ms "
                      f"(fp32 {quantized.fp32_latency_ms:.2f} ms){'; ' + '; '.join(quantized.warnings) if quantized.warnings else ''}", highlight=False)
    if result.sample_probabilities:
        table = Table(title="probabilities of a few of your images (compare with your own pipeline)", title_justify="left")
        table.add_column("file")
        for label in result.card.labels:
            table.add_column(label)
        for file, probs in result.sample_probabilities:
            table.add_row(Path(file).name, *(f"{probs[label]:.6f}" for label in result.card.labels))
        console.print(table)
    where = bundle.bundle_dir if bundle is not None else result.onnx_path
    console.print(f"wrote [bold]{where}[/]. {CLINICAL_NOTE}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
