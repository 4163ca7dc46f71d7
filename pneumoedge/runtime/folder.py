"""Folder inference: find every file, predict the images, account for every file in the results.

The row contract lives here, once, for every engine: discovery (`discover`, the one scanner of
input folders), skipped and error rows, `--resume`, one whole line per write, the summary and
its exit code. Where predictions are computed is an `Engine` (pneumoedge.runtime.engine).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from pneumoedge.explain.overlay import write_png_atomic
from pneumoedge.imageio import DICOM_SUFFIXES, IMAGE_SUFFIXES
from pneumoedge.runtime.engine import Engine, LocalEngine, Postprocess
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.prediction import Prediction
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

    def record(self, prediction: Prediction) -> None:
        """Count one predicted image's row."""
        if prediction.status == "ok":
            self.ok += 1
            self.labels[prediction.label] += 1
            self.overlays += bool(prediction.overlay_path)
            self.ood += prediction.ood is True
        else:
            self.failed(prediction.source, prediction.error)

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
    # A DICOMDIR is known by its content (pneumoedge.dicom.sniff_dicom), whatever its name.
    dicom = _dicom_kind(path) if suffix not in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES else ""
    if dicom == "dicomdir":
        return "skipped", "DICOMDIR: the index of a DICOM export, not an image"
    if suffix in IMAGE_SUFFIXES or dicom:
        return "image", ""
    return "skipped", f"not an image file ({suffix or 'no suffix'})"


def _dicom_kind(path: Path) -> str:
    from pneumoedge.dicom import SNIFF_BYTES, sniff_dicom

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a pipe: it would block
            return ""
        with open(path, "rb") as handle:
            return sniff_dicom(handle.read(SNIFF_BYTES))
    except OSError:  # unreadable or gone: classified by its suffix alone
        return ""


#: Called after every row: (rows written, rows expected or None, the summary so far).
ProgressCallback = Callable[[int, Optional[int], "RunSummary"], None]


def run_folder(
    model: Union[Ensemble, Engine],
    inputs: Sequence[Path],
    *,
    writer: ResultWriter,
    out: Optional[Path] = None,
    overwrite: bool = False,
    resume: bool = False,
    batch_size: int = 8,
    workers: Optional[int] = None,
    recursive: bool = True,
    progress: Optional[ProgressCallback] = None,
    heatmaps: Optional[Path] = None,
    overlay_side: int = 768,
) -> RunSummary:
    """Predict every image under `inputs`, streaming one row per file to `writer`.

    Args:
        model: a loaded `Ensemble` (run here: `LocalEngine` with `batch_size` and `workers`)
            or any `Engine`, which this function closes when the run ends.
        writer: the result file's writer; `out` is its path (None: standard output).
        resume: keep the rows already finished in `out` and do not run their files again.
        progress: called after each row; given one, the files are counted first, so that it
            learns the total (its first call has 0 rows written).
        heatmaps: a folder; each classified image also gets an overlay PNG there, at the
            input's relative path plus ".png", written atomically; its path goes into the row.
    """
    for root in inputs:
        if not root.exists():
            raise InputError(f"{root}: no such file or folder")
    engine = LocalEngine(model, batch_size=batch_size, workers=workers) if isinstance(model, Ensemble) else model
    try:
        done = writer.open(out, overwrite=overwrite, resume=resume)
        summary = RunSummary(provider=engine.provider, output=str(out) if out else "-")
        exclude = [out] if out else []
        found = discover(inputs, recursive=recursive, exclude=exclude)
        tick = _ticker(summary, progress, total=sum(1 for _ in discover(inputs, recursive=recursive, exclude=exclude)) if progress else None)
        postprocess = None if heatmaps is None else overlay_writer(inputs, heatmaps, overlay_side)
        images = _images_to_run(found, done, writer, summary, tick)
        for prediction in engine.predict(images, explain=heatmaps is not None, postprocess=postprocess):
            writer.write(prediction)
            summary.record(prediction)
            tick()
    finally:
        engine.close()
        writer.close()
    return summary


def _ticker(summary: RunSummary, progress: Optional[ProgressCallback], total: Optional[int]) -> Callable[[], None]:
    """Count written rows, keep `summary.elapsed_s` current, and report to `progress`."""
    start = time.perf_counter()
    rows = 0

    def tick(advance: int = 1) -> None:
        nonlocal rows
        rows += advance
        summary.elapsed_s = time.perf_counter() - start
        if progress is not None:
            progress(rows, total, summary)

    tick(0)
    return tick


def _images_to_run(
    found: Iterable[tuple[Path, str, str]], done: set[str], writer: ResultWriter, summary: RunSummary, tick: Callable[[], None]
) -> Iterator[Path]:
    """The image paths still to predict; writes the skipped and error rows of the rest as it goes."""
    for path, kind, reason in found:
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
        tick()


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


def overlay_writer(inputs: Sequence[Path], folder: Path, side: int) -> Postprocess:
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
