"""Options shared by several verbs, declared once, and the one way a verb reports a user's mistake."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from pneumoedge.bundle import BundleError
from pneumoedge.imageio import ImageError
from pneumoedge.preprocessing import SpecError
from pneumoedge.runtime.folder import InputError
from pneumoedge.runtime.results import OutputError
from pneumoedge.runtime.sessions import DeviceError

#: Exit code for a usage or configuration error (bad model, unavailable device, bad option).
EXIT_USAGE = 2

CLINICAL_NOTE = "Decision support for clinicians only, never a diagnosis."

Models = Annotated[
    Optional[List[Path]],
    typer.Option(
        "--model",
        "-m",
        help="A bundle folder, or an .onnx file (repeat for an ad-hoc ensemble). Default: the bundled model.",
        show_default=False,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        help="cpu, cuda (fails clearly if CUDA cannot run; needs onnxruntime-gpu) or auto (CUDA when it works).",
        case_sensitive=False,
    ),
]
Precision = Annotated[
    str,
    typer.Option(
        help="Bundle members to run: auto (this computer's fastest that passed its accuracy check: what "
        "`pneumoedge tune` measured, else int8 only with VNNI/AMX), default (the bundle's choice), fp32 or int8."
    ),
]
Threads = Annotated[
    Optional[int],
    typer.Option(min=1, help="onnxruntime intra-op threads per model. Default: one per physical core."),
]
BatchSize = Annotated[int, typer.Option("--batch", min=1, help="Images per model run.")]

stderr = Console(stderr=True)


class UserError(Exception):
    """A mistake the user can fix; shown as one line, no traceback."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors into a one-line message and exit code 2."""
    try:
        yield
    except (UserError, BundleError, DeviceError, SpecError, ImageError, InputError, OutputError, OSError) as exc:
        logging.getLogger("pneumoedge").debug("user error", exc_info=True)
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None


def model_arg(models: Optional[List[Path]]):
    """`--model` values as `pneumoedge.load` takes them."""
    if not models:
        return None
    return models[0] if len(models) == 1 else list(models)
