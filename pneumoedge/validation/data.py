"""Labelled data for local validation: one folder per label, or a CSV of path,label; every file accounted for.

The listing is tied to the report by a checksum over (label, relative path, size, sha256 of
the file's bytes) of every listed entry, so "what was tested" can be checked later.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from pneumoedge.runtime.folder import discover


class DataError(ValueError):
    """Labelled data that cannot be read as asked (layout, labels, CSV columns)."""


@dataclass(frozen=True)
class Entry:
    """One listed file: its path, its true label, and for files not run why not ("" when it is an image)."""

    path: Path
    label: str
    kind: str = "image"  # "image" (run), "skipped" (not an image file) or "error" (cannot be listed)
    reason: str = ""


@dataclass(frozen=True)
class Listing:
    """Every entry of the labelled data, where the labels came from, and the listing's checksum."""

    entries: tuple[Entry, ...]
    source: str  # "folder names" or "CSV file NAME"
    root: Path
    sha256: str
    lines: tuple[str, ...]

    @property
    def images(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "image"]


def read_labelled(data: Union[str, Path], labels: Sequence[str]) -> Listing:
    """List labelled data for a model with `labels`.

    Args:
        data: a folder with one subfolder per label (names as the model's labels, any case;
            a Kaggle-layout root means its test/ split), or a CSV file
            with columns path,label (a header row is optional; relative paths are relative to
            the CSV's folder).
        labels: the model's labels; every label in the data must be one of them.

    Raises:
        DataError: naming what to fix.
    """
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such folder or CSV file")
    canonical = {label.lower(): label for label in labels}
    if data.is_file():
        entries, source, root = _from_csv(data, canonical), f"CSV file {data.name}", data.parent
    else:
        split = data / "test"
        if not _label_folders(data, canonical) and split.is_dir() and _label_folders(split, canonical):
            data = split  # a Kaggle-layout root: its held-out test split, never train or val
        entries, source, root = _from_folders(data, canonical, labels), "folder names", data
    if not any(e.kind == "image" for e in entries):
        raise DataError(f"{data}: no image files found")
    lines = tuple(_line(e, root) for e in entries)
    digest = hashlib.sha256("".join(line + "\n" for line in lines).encode("utf-8")).hexdigest()
    return Listing(tuple(entries), source, root, digest, lines)


def _label_folders(folder: Path, canonical: dict[str, str]) -> bool:
    return any(p.is_dir() and p.name.lower() in canonical for p in folder.iterdir())


def _from_folders(data: Path, canonical: dict[str, str], labels: Sequence[str]) -> list[Entry]:
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name.lower() not in canonical]
    known = [p for p in folders if p.name.lower() in canonical]
    if not known:
        hint = " (a Kaggle root without test/? give the split folder to validate on)" if any(p.name in ("train", "val") for p in folders) else ""
        raise DataError(f"{data}: no folder named after a label ({', '.join(labels)}); one folder per label, or a CSV of path,label{hint}")
    if unknown:
        raise DataError(f"{data}: folders {', '.join(unknown)} are not labels of this model ({', '.join(labels)}); move them out or use a CSV")
    entries = []
    for folder in known:
        label = canonical[folder.name.lower()]
        for path, kind, reason in discover([folder]):
            entries.append(Entry(path, label, kind, reason))
    return entries


def _from_csv(path: Path, canonical: dict[str, str]) -> list[Entry]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as a UTF-8 CSV ({exc})") from None
    rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    entries = []
    for number, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise DataError(f"{path}: row {number} has {len(row)} column(s); write path,label")
        name, label = row[0].strip(), row[1].strip()
        if label.lower() not in canonical:
            raise DataError(f"{path}: row {number}: label {label!r} is not one of the model's ({', '.join(canonical.values())})")
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        # a missing file stays in the listing: the run reports it as an error row, it is never dropped
        entries.append(Entry(file, canonical[label.lower()]))
    return entries


def _line(entry: Entry, root: Path) -> str:
    try:
        name = entry.path.relative_to(root).as_posix()
    except ValueError:
        name = entry.path.as_posix()
    size, digest = _size_and_sha256(entry.path) if entry.kind == "image" else (None, None)
    return "\t".join([entry.label, name, "" if size is None else str(size), digest or "", entry.kind])


def _size_and_sha256(path: Path) -> tuple[Optional[int], Optional[str]]:
    digest = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a pipe: it would block
            return None, None
        with open(path, "rb") as handle:
            size = 0
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except OSError:
        return None, None  # unreadable: the run says why
    return size, digest.hexdigest()
