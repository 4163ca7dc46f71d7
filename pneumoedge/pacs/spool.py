"""Durable folders of DICOM files: written to a temporary name, fsynced, renamed, in arrival order."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Optional

from pneumoedge.atomic import write_atomic

SUFFIX = ".dcm"


def write_durably(folder: Path, name: str, data: bytes) -> Path:
    """Write `data` as `folder/name` so that it is either whole on disk or absent, the rename
    itself fsynced (`atomic.write_atomic`, durable: its arrival may be acknowledged to a PACS)."""
    return write_atomic(Path(folder) / name, data, durable=True)


class Spool:
    """A folder of files named so that sorting them gives their arrival order.

    Names are `<nanoseconds>-<counter>-<key>.dcm`; leftovers of an interrupted write (hidden
    temporary files) are removed on open, since nothing was acknowledged for them.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        for stale in self.folder.glob(".*"):  # the folder is the spool's own: only temporary files are hidden
            if stale.is_file():
                stale.unlink(missing_ok=True)

    def put(self, key: str, data: bytes) -> Path:
        """Store one object durably; return its path. Safe from several threads."""
        with self._lock:
            name = f"{time.time_ns():020d}-{next(self._counter):06d}-{_safe(key)}{SUFFIX}"
        path = write_durably(self.folder, name, data)
        with self._ready:
            self._ready.notify_all()
        return path

    def pending(self) -> list[Path]:
        """Stored files, oldest first."""
        return sorted(p for p in self.folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def wait(self, timeout: Optional[float]) -> None:
        """Sleep until something is put, or `timeout` seconds pass."""
        with self._ready:
            self._ready.wait(timeout)

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def __len__(self) -> int:
        return len(self.pending())


def key_of(path: Path) -> str:
    """The key a spooled file was stored under (its name without order prefix and suffix)."""
    return path.name[: -len(SUFFIX)].split("-", 2)[-1]


def _safe(key: str) -> str:
    """UIDs are digits and dots; anything else in a key is replaced so it is always a plain name."""
    cleaned = "".join(c if c.isalnum() or c in "._" else "_" for c in key)
    return cleaned[:128] or "unnamed"
