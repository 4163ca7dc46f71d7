"""`pneumoedge evaluate`: metrics and plots of a run (Keras) or a bundle/ONNX model (runtime) on labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import UserError, stderr, user_errors


def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A run folder (from train), a bundle folder, or an .onnx file.", show_default=False)],
    data_dir: Annotated[Path, typer.Argument(help="Labelled images: a Kaggle root (its test/ is used) or one split folder with NORMAL/ and PNEUMONIA/.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for evaluation.json and the PNG plots. Default: RUN/evaluation/NAME, or evaluation/MODEL.", show_default=False)] = None,
    precision: Annotated[str, typer.Option(help="Bundle members to run: default, fp32 or int8.")] = "default",
    threshold: Annotated[Optional[float], typer.Option(help="Override the decision threshold (binary).", show_default=False)] = None,
) -> None:
    """Confusion matrix, per-class precision/recall/F1, accuracy and ROC AUC, as JSON plus PNG plots.

    A run folder is evaluated with Keras (needs the [export] extra); a bundle or .onnx with the
    runtime (onnxruntime only), exactly as `infer` would run it.
    """
    if (model / "manifest.json").is_file() or (model.is_file() and model.suffix.lower() == ".onnx"):
        _validate_instead(model, data_dir, out or Path("evaluation") / model.stem, precision, threshold)
        return
    with user_errors():
        from pneumoedge.export.evaluation import evaluate_run

        metrics = evaluate_run(model, data_dir, out, threshold=threshold)
    console = Console()
    table = Table(title=f"{model} on {data_dir} ({metrics['split']}, {metrics['images']} images, {metrics['engine']})", title_justify="left")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column)
    for label, m in metrics["per_class"].items():
        table.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    console.print(table)
    auc = "-" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.3f}"
    line = f"accuracy {metrics['accuracy']:.3f}, ROC AUC {auc} ({metrics['roc_auc_kind']})"
    if "threshold" in metrics:
        line += f", sensitivity {metrics['sensitivity']:.3f}, specificity {metrics['specificity']:.3f} at threshold {metrics['threshold']:.4f}"
    console.print(line)
    console.print(f"confusion matrix (rows true, columns predicted, {', '.join(metrics['labels'])}): {metrics['confusion_matrix']}")
    if metrics.get("failed"):
        console.print(f"[yellow]{len(metrics['failed'])} image(s) could not be read; see evaluation.json[/]")
    console.print(f"written: {', '.join(metrics['files'].values())}")
    if metrics.get("failed"):
        raise typer.Exit(1)


def _validate_instead(model: Path, data_dir: Path, out: Path, precision: str, threshold: Optional[float]) -> None:
    """A bundle or .onnx: `pneumoedge validate`'s report (runtime only, with intervals), one code for both verbs."""
    from pneumoedge.commands.validate import print_report, run_validate

    if threshold is not None:
        with user_errors():
            raise UserError("--threshold applies to run folders; for a bundle, choose a site threshold: "
                            f"pneumoedge validate {model} {data_dir} --site-threshold fixed:{threshold:g} (then --site)")
    result = run_validate(model, data_dir, out, precision=precision, overwrite=True)
    print_report(result.report, result.files)
    stderr.print(f"(evaluate on a bundle is `pneumoedge validate`: {out}/report.html)", markup=False, highlight=False)
    raise typer.Exit(1 if result.report["data"]["unreadable"] else 0)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
