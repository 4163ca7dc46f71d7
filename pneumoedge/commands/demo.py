"""`pneumoedge demo`: the whole chain on generated phantoms, end to end (needs the [export] extra)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, user_errors


def demo_command(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Empty folder for every artefact. Default: a new pneumoedge-demo-* folder in the current directory.", show_default=False)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny images and 2 epochs (about a minute): a smoke test, the models learn little.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the phantoms and training.")] = 0,
) -> None:
    """Generate phantoms -> train two architectures -> evaluate -> export with parity -> int8 -> bundle -> infer.

    Prints where each artefact went and how long each step took. The models are trained on
    synthetic phantoms: a demonstration of the pipeline, not a clinical model.
    """
    console = Console()
    with user_errors():
        from pneumoedge.export.demo import run_demo
        from pneumoedge.export.report import SYNTHETIC_NOTICE

        folder = out or Path(tempfile.mkdtemp(prefix="pneumoedge-demo-", dir="."))
        console.print(f"pneumoedge demo ({'quick' if quick else 'full'}) into [bold]{folder}[/]; {SYNTHETIC_NOTICE}")
        result = run_demo(folder, quick=quick, seed=seed, progress=lambda m: console.print(m, highlight=False))
    steps = Table(title="time per step", title_justify="left")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    for name, seconds in result.steps.items():
        steps.add_row(name, f"{seconds:.1f}")
    steps.add_row("total", f"{sum(result.steps.values()):.1f}")
    console.print(steps)
    figures = Table(title="test split (synthetic)", title_justify="left")
    for column in ("model", "accuracy", "ROC AUC", "sensitivity", "specificity"):
        figures.add_column(column)
    for name, m in result.evaluations.items():
        auc = "-" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
        figures.add_row(name, f"{m['accuracy']:.3f}", auc, f"{m.get('sensitivity', float('nan')):.3f}", f"{m.get('specificity', float('nan')):.3f}")
    console.print(figures)
    artefacts = Table(title="artefacts", title_justify="left")
    artefacts.add_column("what")
    artefacts.add_column("where")
    for name, path in result.artefacts.items():
        artefacts.add_row(name, path)
    console.print(artefacts)
    console.print(f"next: pneumoedge infer {result.artefacts['examples']} --model {result.artefacts['bundle']}")
    console.print(f"{SYNTHETIC_NOTICE}. {CLINICAL_NOTE}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
