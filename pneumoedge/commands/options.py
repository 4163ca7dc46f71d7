"""Options shared by several verbs, declared once, and the one way a verb reports a user's mistake."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, List, Optional, Union

import typer
from rich.console import Console
from rich.markup import escape
from typing_extensions import Annotated

from pneumoedge.bundle import BundleError
from pneumoedge.datasets.kaggle import DatasetError
from pneumoedge.export.errors import ExportError
from pneumoedge.imageio import ImageError
from pneumoedge.preprocessing import SpecError
from pneumoedge.runtime.folder import InputError
from pneumoedge.runtime.results import OutputError
from pneumoedge.runtime.sessions import DeviceError
from pneumoedge.thresholds import ThresholdError
from pneumoedge.validation.metrics import MetricsError

#: Exit code for a usage or configuration error (bad model, unavailable device, bad option).
EXIT_USAGE = 2
#: What a training-side verb says when the [export] extra is missing.
EXPORT_EXTRA_HINT = 'this command needs the training extra: pip install "pneumoedge[export]"'
#: Modules of the [export] extra: a verb that misses one says which extra to install.
EXPORT_EXTRA_MODULES = ("tensorflow", "keras", "tf2onnx", "onnx", "matplotlib", "sympy")
#: The library's errors that are the user's to fix (a one-line message, exit 2).
USER_ERRORS = (BundleError, DatasetError, DeviceError, ExportError, ImageError, InputError, MetricsError, OutputError,
               SpecError, ThresholdError, OSError)

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
Site = Annotated[
    Optional[Path],
    typer.Option(
        "--site",
        help="A site.json from `pneumoedge validate --site-threshold`: this site's decision threshold for the bundle "
        "(the bundle is not changed; a site file made for another bundle is refused).",
        show_default=False,
    ),
]
BatchSize = Annotated[int, typer.Option("--batch", min=1, help="Images per model run.")]

stderr = Console(stderr=True)


class UserError(Exception):
    """A mistake the user can fix; shown as one line, no traceback."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """THE CLI error layer: the library's user-facing errors (and a missing [export] extra) as one line, exit 2."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if not (exc.name and exc.name.split(".")[0] in EXPORT_EXTRA_MODULES):
            raise
        _fail(f"{EXPORT_EXTRA_HINT} (missing module {exc.name!r})")
    except (UserError, *USER_ERRORS) as exc:
        logging.getLogger("pneumoedge").debug("user error", exc_info=True)
        _fail(str(exc))


def _fail(message: str) -> None:
    # escape: a message's own brackets (pip install "pneumoedge[export]") are text, not rich markup
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE) from None


def parse_scale(text: Union[str, float]) -> float:
    """'1/255', '0.0039', 1 -> float; a UserError otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    value = str(text).strip()
    try:
        if "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"scale must be a number or a fraction like 1/255, got {text!r}") from None


def parse_floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    """'0.485,0.456,0.406' -> a tuple of floats (None stays None); a UserError otherwise."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    """'NORMAL, PNEUMONIA' -> ['NORMAL', 'PNEUMONIA'] (empty items dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def model_arg(models: Optional[List[Path]]):
    """`--model` values as `pneumoedge.load` takes them."""
    if not models:
        return None
    return models[0] if len(models) == 1 else list(models)
