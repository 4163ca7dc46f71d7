"""The `pneumoedge` command: a typer app whose verbs live in `pneumoedge.commands`."""

from __future__ import annotations

import importlib
import logging

import typer
from typing_extensions import Annotated

from pneumoedge import __version__

#: Verb modules, in the order `--help` lists them. Training-side verbs import TensorFlow
#: only inside their functions, so `--help`, `infer`, `info` and `bench` never load it.
VERBS = ("infer", "explain", "serve", "listen", "info", "tune", "bench", "bundle", "train", "evaluate", "export", "demo")

app = typer.Typer(
    name="pneumoedge",
    help="Chest X-ray pneumonia classifiers: train, export to ONNX, and run fast on clinic computers. "
    "Results are decision support for clinicians, never a diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pneumoedge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details (decode errors, providers).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )


for _verb in VERBS:
    try:
        _module = importlib.import_module(f"pneumoedge.commands.{_verb}")
    except ModuleNotFoundError as exc:  # a verb not written yet in this checkout
        if exc.name != f"pneumoedge.commands.{_verb}":
            raise
        continue
    _module.register(app)
