"""The `pneumoedge` command: a typer app whose verbs live in `pneumoedge.commands`."""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Optional

import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

from pneumoedge import __version__

#: Each command and the module under `pneumoedge.commands` that registers it, in the order
#: `--help` lists them. A verb's module is imported only when that verb runs (or `--help`
#: lists them all): `pneumoedge infer` never pays for the web server's or the DICOM node's
#: imports, and training-side verbs import TensorFlow only inside their functions.
VERBS = {
    "infer": "infer", "explain": "explain", "validate": "validate", "serve": "serve", "listen": "listen", "send-results": "listen",
    "info": "info", "tune": "tune", "bench": "bench", "bundle": "bundle", "train": "train",
    "evaluate": "evaluate", "export": "export", "demo": "demo",
}


class LazyVerbs(TyperGroup):
    """The top-level group: lists `VERBS` and imports a verb's module when it is asked for."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: typer.Context, name: str) -> Optional[Any]:
        return verb_command(name) if name in VERBS else None


@functools.lru_cache(maxsize=None)
def verb_command(name: str) -> Any:
    """The (click) command `name`, from its module's `register(app)`."""
    module = importlib.import_module(f"pneumoedge.commands.{VERBS[name]}")
    holder = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")
    module.register(holder)
    return typer.main.get_group(holder).commands[name]


app = typer.Typer(
    cls=LazyVerbs,
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

