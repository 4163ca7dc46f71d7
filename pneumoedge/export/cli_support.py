"""What the training-side CLI verbs share: turning user-facing errors into one line and exit 2."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import typer
from rich.console import Console

from pneumoedge.export.errors import ExportError

EXIT_USAGE = 2
EXPORT_EXTRA_HINT = 'this command needs the training extra: pip install "pneumoedge[export]"'
stderr = Console(stderr=True)


@contextlib.contextmanager
def export_errors() -> Iterator[None]:
    """Show ExportError, dataset/bundle/spec/image errors and a missing [export] extra as one line."""
    from pneumoedge.bundle import BundleError
    from pneumoedge.imageio import ImageError
    from pneumoedge.preprocessing import SpecError
    from pneumoedge.runtime.sessions import DeviceError

    try:
        from pneumoedge.datasets.kaggle import DatasetError
    except ImportError:  # pragma: no cover - the datasets package ships with pneumoedge
        DatasetError = ExportError  # type: ignore[misc,assignment]
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx", "matplotlib", "sympy"):
            stderr.print(f"[bold red]error:[/] {EXPORT_EXTRA_HINT} (missing module {exc.name!r})", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        raise
    except (ExportError, DatasetError, BundleError, SpecError, ImageError, DeviceError, OSError) as exc:
        logging.getLogger("pneumoedge").debug("user error", exc_info=True)
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
