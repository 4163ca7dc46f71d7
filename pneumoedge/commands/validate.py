"""`pneumoedge validate`: a bundle on this clinic's labelled images, with uncertainty, as report.json + report.html."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, Device, Precision, UserError, stderr, user_errors
from pneumoedge.commands.progress import folder_progress
from pneumoedge.imageio import decoder_messages_to_log
from pneumoedge.site import SiteError
from pneumoedge.thresholds import ThresholdError
from pneumoedge.validation.data import DataError
from pneumoedge.validation.metrics import MetricsError
from pneumoedge.validation.plots import INSTALL_HINT

if TYPE_CHECKING:
    from pneumoedge.validation.report import Validation


def validate_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle folder to validate.", show_default=False)],
    data: Annotated[Path, typer.Argument(help="Labelled images: a folder with one subfolder per label (NORMAL/, PNEUMONIA/), or a CSV of path,label.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: report.html, report.json, predictions.csv (infer's rows), listing.tsv, gallery/.")] = Path("report"),
    prevalence: Annotated[Optional[float], typer.Option(help="Your clinic's prevalence (0..1) for PPV/NPV, besides this sample's.", show_default=False)] = None,
    width: Annotated[float, typer.Option(help="95 % interval width the precision note computes the images needed for.")] = 0.1,
    site_threshold: Annotated[Optional[str], typer.Option("--site-threshold", help="Choose this site's threshold on these images and write site.json: sensitivity:0.95, youden or fixed:X.", show_default=False)] = None,
    site: Annotated[Optional[Path], typer.Option("--site", help="Validate with an existing site.json's threshold (monitoring after go-live).", show_default=False)] = None,
    gallery: Annotated[int, typer.Option(min=0, help="How many of the worst errors to show with heatmaps (false negatives first).")] = 8,
    device: Device = "cpu",
    precision: Precision = "auto",
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime threads per model run. Default: as infer.", show_default=False)] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, help="Images per model run. Default: as infer.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding threads. Default: min(8, CPUs).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a report already in --out.")] = False,
    progress: Annotated[Optional[bool], typer.Option(help="Show a progress bar. Default: only when standard error is a terminal.", show_default=False)] = None,
) -> None:
    """Validate a bundle on this clinic's labelled images before go-live.

    Every number comes with its 95 % interval (Wilson for proportions, DeLong for ROC AUC), on all
    images and on the in-distribution ones; unreadable files are counted; predictions.csv holds
    exactly the rows `pneumoedge infer` writes. Plots need `pip install "pneumoedge[report]"`.

    Exit codes: 0 report written; 1 report written, some files could not be read; 2 usage error.
    """
    result = run_validate(bundle, data, out, device=device, precision=precision, threads=threads, batch_size=batch, workers=workers,
                          prevalence=prevalence, width=width, site=site, site_threshold=site_threshold, gallery=gallery,
                          overwrite=overwrite, progress=progress)
    print_report(result.report, result.files)
    raise typer.Exit(1 if result.report["data"]["unreadable"] else 0)


def run_validate(bundle: Path, data: Path, out: Path, *, device: str = "cpu", threads: Optional[int] = None,
                 progress: Optional[bool] = None, **options: Any) -> "Validation":
    """`pneumoedge.validation.report.validate` with a progress bar and one-line errors (also `evaluate`'s, for bundles)."""
    from pneumoedge.validation.report import validate

    with user_errors(), decoder_messages_to_log():
        try:
            show = stderr.is_terminal if progress is None else progress
            with folder_progress(stderr, show, title="validate") as on_row:
                return validate(
                    bundle, data, out, device=device.lower(), threads="auto" if threads is None else threads, progress=on_row,
                    note=lambda text: stderr.print(escape(text), highlight=False, soft_wrap=True), **options,
                )
        except (DataError, ThresholdError, SiteError, MetricsError) as exc:
            raise UserError(str(exc)) from None


def _ci(estimate: dict[str, Any]) -> str:
    if estimate.get("value") is None:
        return "–"
    if estimate.get("ci_low") is None:
        return f"{estimate['value']:.3f}"
    return f"{estimate['value']:.3f} ({estimate['ci_low']:.3f}–{estimate['ci_high']:.3f})"


def print_report(report: dict[str, Any], files: dict[str, str]) -> None:
    """The key numbers and where the report is, on standard error."""
    table = Table(title=f"pneumoedge validate: {escape(report['bundle']['name'])}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    data, ood = report["data"], report["ood"]
    table.add_row("images", f"{report['n']} classified ({escape(', '.join(f'{k} {v}' for k, v in report['per_label'].items()))}); "
                  f"{data['unreadable']} unreadable, {data['skipped']} skipped")
    if ood["available"]:
        table.add_row("out of distribution", f"{ood['flagged']} ({ood['rate'] * 100 if ood['rate'] is not None else 0:.1f} %)")
    if report["threshold"] is not None:
        table.add_row("threshold", f"{report['threshold']:.4f} ({escape(report['threshold_source'])})")
        table.add_row("sensitivity (95 % CI)", _ci(report["sensitivity"]))
        table.add_row("specificity (95 % CI)", _ci(report["specificity"]))
        table.add_row("ROC AUC (DeLong 95 % CI)", _ci(report["roc_auc"]))
    else:
        for label, numbers in report["subsets"]["all"]["per_class"].items():
            table.add_row(f"{escape(label)} sens/spec/AUC", f"{_ci(numbers['sensitivity'])} / {_ci(numbers['specificity'])} / {_ci(numbers['roc_auc'])}")
    if report["calibration"]["ece"] is not None:
        table.add_row("calibration", f"ECE {report['calibration']['ece']:.3f}, Brier {report['calibration']['brier']:.3f}")
    if "site_threshold" in report:
        table.add_row("site threshold", f"{report['site_threshold']['threshold']:.4f} -> {escape(files['site.json'])}")
    table.add_row("report", escape(files["report.html"]))
    stderr.print(table)
    if not report["plots"]:
        stderr.print(f"[yellow]no plots:[/] matplotlib is not installed ({escape(INSTALL_HINT)}); every number is in the report",
                     highlight=False, soft_wrap=True)
    for limit in report["limits"][:2]:
        stderr.print(f"[dim]{escape(limit)}[/]", highlight=False, soft_wrap=True)
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_command)
