"""`pneumoedge explain`: one image's heatmap overlay, from the exported graph (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, Device, Models, Precision, UserError, model_arg, stderr, user_errors
from pneumoedge.explain.overlay import write_png_atomic
from pneumoedge.runtime.loading import load


def explain(
    image: Annotated[Path, typer.Argument(help="The image (JPEG, PNG, BMP, TIFF or DICOM).", show_default=False)],
    model: Models = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Overlay PNG to write. Default: IMAGE's name + .overlay.png in the current folder.", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    device: Device = "cpu",
    precision: Precision = "default",
    overlay_size: Annotated[int, typer.Option(min=128, help="Longest side of the overlay, in pixels.")] = 1024,
) -> None:
    """Show where the model looked: write IMAGE with its Grad-CAM heatmap, the label and probability.

    The heatmap comes out of the exported ONNX graph (Grad-CAM of the positive label's log-odds
    for a binary model), averaged over the ensemble's members with their weights, on the
    original image. Colour marks what raised the score; uncoloured areas did not.
    Exit codes: 0 written; 1 the image could not be read; 2 usage or model error.
    """
    with user_errors():
        target = out if out is not None else Path(f"{image.name}.overlay.png")
        if target.exists() and not overwrite:
            raise UserError(f"{target} already exists; use --overwrite to replace it")
        if not image.exists():
            raise UserError(f"{image}: no such file")
        ensemble = load(model_arg(model), device=device.lower(), precision=precision)
        if not ensemble.can_explain:
            raise UserError(ensemble.explain_note)
    prediction = next(ensemble.predict_many([image], batch_size=1, explain=True))
    if prediction.status != "ok":
        stderr.print(f"[red]error[/] {image}: {prediction.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    with user_errors():
        write_png_atomic(target, prediction.overlay(overlay_size))
    explanation = prediction.explanation
    typer.echo(f"{image}: {prediction.label} (p = {prediction.probability:.4f}); overlay: {target}")
    if explanation is not None and explanation.empty:
        typer.echo(f"empty heatmap: no region raised the {explanation.score}")
    sources = "; ".join(f"{name}: {how}" for name, how in ensemble.map_sources().items())
    stderr.print(f"heatmap from {sources}", highlight=False, soft_wrap=True)
    if ensemble.explain_note:
        stderr.print(f"[yellow]{ensemble.explain_note}[/]", highlight=False, soft_wrap=True)
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
