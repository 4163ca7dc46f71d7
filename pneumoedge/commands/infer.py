"""`pneumoedge infer`: run a model or ensemble over files and folders, one result row per file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import (
    CLINICAL_NOTE,
    Device,
    Models,
    Precision,
    Site,
    UserError,
    model_arg,
    stderr,
    user_errors,
)
from pneumoedge.commands.progress import folder_progress
from pneumoedge.imageio import decoder_messages_to_log
from pneumoedge.runtime.loading import load
from pneumoedge.runtime.folder import RunSummary, run_folder
from pneumoedge.runtime.results import FORMATS, OutputError, ResultWriter


# Long only in its signature: that is the verb's option table (typer reads it); the body is short.
def infer(
    inputs: Annotated[List[Path], typer.Argument(help="Image files and/or folders (searched recursively).", show_default=False)],
    model: Models = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Result file (.csv or .jsonl). Default: CSV on standard output."),
    ] = None,
    fmt: Annotated[
        Optional[str], typer.Option("--format", help="csv or jsonl. Default: from --out's suffix, else csv.")
    ] = None,
    device: Device = "cpu",
    precision: Precision = "auto",
    site: Site = None,
    threads: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="onnxruntime threads per model run. With 1, each CPU core runs its own batch at once. "
            "Default: what `pneumoedge tune` measured here, else 1 (all cores for big models).",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        Optional[int],
        typer.Option("--batch", min=1, help="Images per model run. Default: the tuned choice, else 8 (4 for big models).", show_default=False),
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding threads. Default: min(8, CPUs).")] = None,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run: keep --out's finished rows, do the rest.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    recursive: Annotated[bool, typer.Option(help="Search folders recursively.")] = True,
    progress: Annotated[
        Optional[bool], typer.Option(help="Show a progress bar. Default: only when standard error is a terminal.")
    ] = None,
    heatmaps: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder for heatmap overlays: one PNG per classified image (its path below the input folder + .png), "
            "the path in the results' overlay column. Needs a model whose graphs carry heatmaps (see `pneumoedge info`).",
            show_default=False,
        ),
    ] = None,
    overlay_size: Annotated[
        int, typer.Option(min=128, help="Largest longest side of each overlay PNG, in pixels (never beyond what the model decoded, unless tiny).")
    ] = 768,
    engine: Annotated[
        str,
        typer.Option(
            help='Where predictions run: local (this process) or ray (Ray Data workers, one model each, same rows; '
            'pip install "pneumoedge[ray]"; see docs/scale.md). --threads is then CPUs per worker.'
        ),
    ] = "local",
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            "--ray-address",
            help="With --engine ray: join this cluster (head HOST:PORT; every node must see the inputs and the model at the same paths). "
            "Default: a private local Ray on 127.0.0.1, stopped when the run ends.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Classify chest X-ray images; write one row per input file.

    Every file under the inputs gets a row: status ok (with label and probabilities), error
    (unreadable image; the reason is in the row) or skipped (not an image file).

    Exit codes: 0 all images succeeded; 1 some inputs failed (see rows with status error);
    2 usage or model error (nothing run); 3 no image files found.
    """
    with user_errors(), decoder_messages_to_log():  # libjpeg/libpng lines never mix into the output
        fmt = _choose_format(fmt, out)
        if resume and out is None:
            raise OutputError("--resume needs --out (the file to finish)")
        ensemble = load(model_arg(model), device=device.lower(), precision=precision, threads="auto" if threads is None else threads, site=site)
        if heatmaps is not None and not ensemble.can_explain:
            raise UserError(f"--heatmaps: {ensemble.explain_note}")
        if heatmaps is not None and heatmaps.exists() and not heatmaps.is_dir():
            raise UserError(f"--heatmaps {heatmaps}: exists and is not a folder")
        writer = ResultWriter(fmt, ensemble.labels, [m.name for m in ensemble.members])
        runner = _engine(engine, ray_address, ensemble, model_arg(model), device.lower(), batch or ensemble.configuration.batch, threads, heatmaps, site)
        show = stderr.is_terminal if progress is None else progress
        with folder_progress(stderr, show) as on_row, _ray_errors():
            summary = run_folder(
                runner,
                inputs,
                writer=writer,
                out=out,
                overwrite=overwrite,
                resume=resume,
                batch_size=batch or ensemble.configuration.batch,
                workers=workers,
                recursive=recursive,
                progress=on_row,
                heatmaps=heatmaps,
                overlay_side=overlay_size,
            )
    _print_summary(summary, ensemble.threshold, ensemble.configuration)
    if site is not None:  # whose threshold decided the labels
        stderr.print(f"threshold {ensemble.threshold:.4f}: {ensemble.threshold_method}", markup=False, highlight=False, soft_wrap=True)
    if heatmaps is not None:
        sources = "; ".join(f"{name}: {how}" for name, how in ensemble.map_sources().items())
        stderr.print(f"heatmaps: {summary.overlays} overlays in {heatmaps} ({sources})", highlight=False, soft_wrap=True)
    raise typer.Exit(summary.exit_code)


def _engine(name: str, address: Optional[str], ensemble, model, device: str, batch: int, threads: Optional[int], heatmaps: Optional[Path],
            site: Optional[Path] = None):
    """The ensemble itself (run here) or a Ray engine for it (pneumoedge.runtime.ray_engine)."""
    if name not in ("local", "ray"):
        raise UserError(f"--engine must be local or ray, got {name!r}")
    if name == "local":
        if address is not None:
            raise UserError("--ray-address needs --engine ray")
        return ensemble
    if heatmaps is not None:
        raise UserError("--heatmaps runs with the local engine only (leave out --engine ray)")
    from pneumoedge.runtime.ray_engine import engine_for

    with _ray_errors():
        return engine_for(ensemble, model, device=device, batch_size=batch, threads=threads, address=address, site=site)


@contextlib.contextmanager
def _ray_errors() -> Iterator[None]:
    """The Ray engine's errors (Ray missing, cluster unreachable, paths not shared) as user errors."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ != "RayEngineError":  # its module is imported only with --engine ray
            raise
        raise UserError(str(exc)) from None


def _choose_format(fmt: Optional[str], out: Optional[Path]) -> str:
    if fmt is None:
        fmt = "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".json") else "csv"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise OutputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def _print_summary(summary: RunSummary, threshold: Optional[float], configuration=None) -> None:
    table = Table(title="pneumoedge infer", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, count in sorted(summary.labels.items()):
        table.add_row(label, str(count))
    if summary.ood:
        table.add_row("unlike training images", f"{summary.ood} (out of distribution: do not rely on these results)")
    table.add_row("errors", str(summary.errors))
    table.add_row("skipped (not images)", str(summary.skipped))
    if summary.resumed:
        table.add_row("kept from earlier run", str(summary.resumed))
    if threshold is not None:
        table.add_row("threshold", f"{threshold:.3f}")
    table.add_row("speed", f"{summary.images_per_s:.1f} images/s ({summary.elapsed_s:.2f} s)")
    table.add_row("provider", summary.provider)
    if configuration is not None:  # what ran and why: tuned on this machine, the untuned rule, or the user's flags
        table.add_row("configuration", configuration.describe())
    table.add_row("results", summary.output)
    stderr.print(table)
    for path, reason in summary.first_errors:
        stderr.print(f"[red]error[/] {path}: {reason}", highlight=False, soft_wrap=True)
    if summary.errors > len(summary.first_errors):
        stderr.print(f"… and {summary.errors - len(summary.first_errors)} more errors (status 'error' in the results)")
    for warning in getattr(configuration, "warnings", ()):
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")


def register(app: typer.Typer) -> None:
    app.command("infer")(infer)
