"""Folder inference: find every file, predict the images, account for every file in the results."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dataclasses import replace

from pneumoedge.explain.overlay import write_png_atomic
from pneumoedge.imageio import IMAGE_SUFFIXES
from pneumoedge.runtime.ensemble import Ensemble, Prediction
from pneumoedge.runtime.results import ResultWriter

log = logging.getLogger(__name__)

#: Exit codes of a folder run (documented in the README).
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_NO_IMAGES = 3


class InputError(ValueError):
    """An input path the user gave does not exist or cannot be listed."""


@dataclass
class RunSummary:
    """Counts of a folder run. `exit_code` follows the documented convention."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0
    resumed: int = 0
    overlays: int = 0
    #: Classified images flagged as unlike the model's training images.
    ood: int = 0
    labels: Counter = field(default_factory=Counter)
    #: The first few failures, (path, reason), for the summary; all of them are in the results.
    first_errors: list = field(default_factory=list)
    elapsed_s: float = 0.0
    provider: str = ""
    output: str = "-"

    def failed(self, path: str, reason: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append((path, reason))
        log.warning("%s: %s", path, reason)

    @property
    def predicted(self) -> int:
        return self.ok + self.errors

    @property
    def images_per_s(self) -> float:
        return self.predicted / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_SOME_FAILED
        if self.predicted + self.resumed == 0:
            return EXIT_NO_IMAGES
        return EXIT_OK


def discover(
    inputs: Sequence[Path], *, recursive: bool = True, exclude: Sequence[Path] = ()
) -> Iterator[tuple[Path, str, str]]:
    """Yield (path, kind, reason) for every file under `inputs`, in a stable order, lazily.

    `kind` is "image" (to predict: an image suffix, or DICOM content), "skipped" (not an
    image file, a DICOMDIR, or a folder link, which is not followed so loops cannot happen)
    or "error" (a folder that cannot be listed). Files named explicitly are always tried as images (the decoder sniffs content). Nothing found
    is dropped silently.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    for root in inputs:
        if not root.is_dir():
            if not root.exists():
                raise InputError(f"{root}: no such file or folder")
            yield root, "image", ""
            continue
        unlistable: list[OSError] = []
        for folder, dirnames, filenames in os.walk(root, onerror=unlistable.append):
            while unlistable:
                error = unlistable.pop()
                yield Path(error.filename), "error", f"cannot list folder: {error.strerror}"
            dirnames.sort()
            here = Path(folder)
            for name in list(dirnames):
                if (here / name).is_symlink():
                    dirnames.remove(name)
                    yield here / name, "skipped", "link to a folder, not followed"
            if not recursive:
                for name in dirnames:
                    yield here / name, "skipped", "subfolder, not searched (--no-recursive)"
                dirnames.clear()
            for name in sorted(filenames):
                path = here / name
                if excluded and os.path.realpath(path) in excluded:
                    continue
                yield (path, *_classify(path))
        for error in unlistable:
            yield Path(error.filename), "error", f"cannot list folder: {error.strerror}"


def _classify(path: Path) -> tuple[str, str]:
    """(kind, reason) of a listed file: by suffix, and DICOM by content.

    PACS exports name DICOM files without a suffix (IM000001) or with a UID whose last part
    looks like one (1.2.840.113619.2.55.3.4): those are recognised by the "DICM" marker after
    the 128-byte preamble. Their DICOMDIR index is listed as skipped, not as a failure.
    """
    suffix = path.suffix.lower()
    if path.name.upper() == "DICOMDIR":
        return "skipped", "DICOMDIR: the index of a DICOM export, not an image"
    if suffix in IMAGE_SUFFIXES:
        return "image", ""
    if _has_dicom_marker(path):
        return "image", ""
    return "skipped", f"not an image file ({suffix or 'no suffix'})"


def _has_dicom_marker(path: Path) -> bool:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a pipe: it would block
            return False
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:  # unreadable or gone: classified by its suffix alone
        return False


def run_folder(
    ensemble: Ensemble,
    inputs: Sequence[Path],
    *,
    writer: ResultWriter,
    out: Optional[Path] = None,
    overwrite: bool = False,
    resume: bool = False,
    batch_size: int = 8,
    workers: Optional[int] = None,
    recursive: bool = True,
    show_progress: bool = False,
    console: Optional[Console] = None,
    heatmaps: Optional[Path] = None,
    overlay_side: int = 768,
) -> RunSummary:
    """Predict every image under `inputs`, streaming one row per file to `writer`.

    With `resume`, rows already finished in `out` are kept and their files not run again.
    With `heatmaps` (a folder), each classified image also gets an overlay PNG there, at the
    input's relative path plus ".png", written atomically; its path goes into the row.
    """
    for root in inputs:
        if not root.exists():
            raise InputError(f"{root}: no such file or folder")
    done = writer.open(out, overwrite=overwrite, resume=resume)
    summary = RunSummary(provider=ensemble.provider, output=str(out) if out else "-")
    exclude = [out] if out else []
    total = sum(1 for _ in discover(inputs, recursive=recursive, exclude=exclude)) if show_progress else None

    def images() -> Iterator[Path]:
        for path, kind, reason in discover(inputs, recursive=recursive, exclude=exclude):
            if str(path) in done:
                summary.resumed += 1
            elif kind == "image":
                yield path
                continue
            elif kind == "skipped":
                writer.write(Prediction(source=str(path), status="skipped", error=reason))
                summary.skipped += 1
            else:
                writer.write(Prediction(source=str(path), status="error", error=reason))
                summary.failed(str(path), reason)
            progress.advance(task)

    progress = Progress(
        TextColumn("[bold]infer"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show_progress,
        transient=False,
    )
    start = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("infer", total=total, rate="")
            postprocess = None if heatmaps is None else overlay_writer(inputs, heatmaps, overlay_side)
            predictions = ensemble.predict_many(
                images(), batch_size=batch_size, workers=workers, explain=heatmaps is not None, postprocess=postprocess
            )
            for prediction in predictions:
                writer.write(prediction)
                if prediction.status == "ok":
                    summary.ok += 1
                    summary.labels[prediction.label] += 1
                    summary.overlays += bool(prediction.overlay_path)
                    summary.ood += prediction.ood is True
                else:
                    summary.failed(prediction.source, prediction.error)
                elapsed = time.perf_counter() - start
                progress.update(task, advance=1, rate=f"{summary.predicted / elapsed:.1f} img/s" if elapsed else "")
    finally:
        summary.elapsed_s = time.perf_counter() - start
        writer.close()
    return summary


def overlay_path(path: Path, inputs: Sequence[Path], folder: Path) -> Path:
    """Where `path`'s overlay goes: its path below the input folder that holds it, plus ".png"."""
    resolved = path.resolve()
    for root in inputs:
        if root.is_dir():
            try:
                relative = resolved.relative_to(root.resolve())
            except ValueError:
                continue
            return folder / relative.parent / f"{relative.name}.png"
    return folder / f"{path.name}.png"


def overlay_writer(inputs: Sequence[Path], folder: Path, side: int):
    """A `predict_many` postprocess: write each classified image's overlay PNG, put its path in the row."""

    def write(prediction: Prediction) -> Prediction:
        if prediction.status != "ok" or prediction.explanation is None:
            return prediction
        target = overlay_path(Path(prediction.source), inputs, folder)
        try:
            write_png_atomic(target, prediction.overlay(side))
        except OSError as exc:
            return replace(prediction, status="error", error=f"classified, but the overlay could not be written to {target}: {exc.strerror or exc}", explanation=None)
        # The written file is the heatmap's record; the arrays are not kept for the rest of the run.
        return replace(prediction, overlay_path=str(target), explanation=None)

    return write
