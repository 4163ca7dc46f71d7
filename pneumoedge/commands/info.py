"""`pneumoedge info`: what a bundle or ONNX model holds, without running it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, Precision, model_arg, user_errors
from pneumoedge.bundle import read_manifest
from pneumoedge.runtime.loading import load
from pneumoedge.runtime.machine import cpu_info


def info(
    models: Annotated[
        Optional[List[Path]],
        typer.Argument(help="A bundle folder or .onnx file(s). Default: the bundled model.", show_default=False),
    ] = None,
    precision: Precision = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show members, preprocessing specs, labels, threshold and provenance of a model.

    Every member's checksum and input shape are verified, so `info` also checks a bundle. The
    configuration line says what `infer` runs here and why (tuned, untuned rule, your flags).
    """
    with user_errors():
        ensemble = load(model_arg(models), precision=precision, threads="auto")
        if ensemble.manifest is not None:
            read_manifest(ensemble.manifest.root)  # load checks the members it opens; info checks them all
    configuration = ensemble.configuration
    described = ensemble.describe()
    manifest = ensemble.manifest
    if manifest is not None:
        described["bundle"] = str(manifest.root)
        described["name"] = manifest.name
        described["precisions"] = list(manifest.precisions)
        described["default_precision"] = manifest.default_precision
        described["provenance"] = manifest.provenance
    described["configuration"] = configuration.to_dict()
    described["machine"] = cpu_info().to_dict()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    console = Console()
    head = Table(show_header=False, title=described.get("name", "model"), title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("task", f"{described['task']}: {', '.join(described['labels'])}")
    if described["threshold"] is not None:
        head.add_row("threshold", f"{described['threshold']:.4f} ({described['threshold_method']})")
    if manifest is not None:
        head.add_row("bundle", described["bundle"])
        head.add_row("precisions", f"{', '.join(described['precisions'])} (default {described['default_precision']})")
    head.add_row("this computer", f"{described['machine']['cpu']} ({cpu_info().flags_text})")
    head.add_row("configuration", configuration.describe())
    heat = described["heatmaps"]
    head.add_row("heatmaps", f"yes: Grad-CAM of the {heat['score']}" + (f" ({heat['note']})" if heat["note"] else "") if heat["available"] else heat["note"])
    head.add_row("out of distribution", described["out_of_distribution"]["note"])
    console.print(head)
    members = Table(title="members", title_justify="left")
    for column in ("name", "precision", "weight", "input", "resize", "scaling", "file"):
        members.add_column(column)
    for m in described["members"]:
        spec = m["spec"]
        scaling = f"x*{spec['scale']:.6g}+{spec['offset']:g}"
        if spec.get("mean") is not None or spec.get("std") is not None:
            scaling += f", mean {spec.get('mean')}, std {spec.get('std')}"
        members.add_row(
            m["name"],
            m["precision"],
            f"{m['weight']:g}",
            f"{spec['height']}x{spec['width']} {spec['color']} {spec['layout']}",
            spec["resize"] + (f", JPEG 1/{spec['decode_reduction']}" if spec.get("decode_reduction", 1) > 1 else ""),
            scaling,
            Path(m["source"]).name,
        )
    console.print(members)
    if manifest is not None and manifest.provenance:
        console.print("[bold]provenance[/]")
        console.print_json(json.dumps(manifest.provenance))
    for warning in configuration.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"[yellow]{CLINICAL_NOTE}[/]")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
