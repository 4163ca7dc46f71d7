"""`pneumoedge bundle create`: compose bundles and self-describing ONNX files into one ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, user_errors

bundle_app = typer.Typer(
    help="Make bundles from other bundles and ONNX files (mixed frameworks, sizes and layouts).",
    no_args_is_help=True,
)


@bundle_app.command("create")
def create(
    out: Annotated[Path, typer.Argument(help="The new bundle folder (must not exist, or be empty).", show_default=False)],
    inputs: Annotated[List[Path], typer.Argument(help="Bundle folders and self-describing .onnx files (from `pneumoedge export`).", show_default=False)],
    weights: Annotated[Optional[str], typer.Option(help="One weight per input, comma-separated (default equal). A bundle counts as one input: its members share its weight in their own proportions.", show_default=False)] = None,
    threshold: Annotated[Optional[str], typer.Option(help="sensitivity:0.95, youden (both need --validation) or fixed:X. Default: carried over when all inputs agree, else chosen on --validation by sensitivity:0.95.", show_default=False)] = None,
    validation: Annotated[Optional[Path], typer.Option(help="Labelled images (NORMAL/ and PNEUMONIA/ folders) to choose the threshold on with the composed ensemble.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default: the folder name).", show_default=False)] = None,
) -> None:
    """Compose an ensemble: each member keeps its own preprocessing; probabilities are averaged by weight.

    fp32 and int8 members are carried over for each precision every input has; member files
    are copied unchanged and the manifest records where each came from, with its sha256.
    """
    console = Console()
    with user_errors():
        from pneumoedge.composition import compose_bundle, parse_weights

        manifest, notes = compose_bundle(
            out, inputs, weights=parse_weights(weights, len(inputs)), threshold_method=threshold, validation=validation,
            name=name, progress=lambda message: console.print(message, highlight=False),
        )
    table = Table(title=f"bundle {manifest.root} (default precision {manifest.default_precision})", title_justify="left")
    for column in ("member", "precision", "weight", "input", "size", "layout", "sha256"):
        table.add_column(column)
    total = {p: sum(m.weight for m in manifest.members if m.precision == p) for p in manifest.precisions}
    for m in manifest.members:
        spec = m.card.spec
        table.add_row(m.name, m.precision, f"{m.weight / total[m.precision]:.3f}", Path((m.origin or {}).get("input", "")).name,
                      f"{spec.height}x{spec.width} {spec.color}", spec.layout, m.sha256[:12])
    console.print(table)
    if manifest.threshold is not None:
        console.print(f"threshold {manifest.threshold:.4f}: {manifest.threshold_method}", highlight=False)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if manifest.provenance.get("synthetic"):
        console.print("[yellow]An input was trained on synthetic phantoms: not for clinical use.[/]")
    console.print(f"[yellow]{CLINICAL_NOTE}[/]")


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
