"""THE atomic file write: a reader sees the old file or the whole new one, never a part.

Every file pneumoedge writes for others to read (manifests, results kept by `--resume`,
overlays, caches, spooled DICOM objects) goes through `write_atomic`: the bytes go to a
temporary file in the target's own folder (so the rename cannot cross file systems), are
fsynced, get their final mode (0644 unless asked: `mkstemp` makes 0600, which other users and
services could not read), and are renamed over the target with `os.replace`. On any failure
the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

__all__ = ["sync_folder", "write_atomic", "write_json_atomic"]


def write_atomic(path: Union[str, Path], data: Union[bytes, str], *, mode: int = 0o644, durable: bool = False) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically and return the path.

    Args:
        path: the target; its folder must exist.
        data: the whole new content.
        mode: the file's permission bits.
        durable: also fsync the folder after the rename, so the rename itself survives a power
            cut (for files whose arrival was acknowledged to someone, e.g. a spooled DICOM object).
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(target.parent)
    return target


def write_json_atomic(path: Union[str, Path], data: Any, *, indent: int = 2, mode: int = 0o644) -> Path:
    """Write `data` as JSON (indented, UTF-8, a final newline) through `write_atomic`."""
    return write_atomic(path, json.dumps(data, indent=indent) + "\n", mode=mode)


def sync_folder(folder: Union[str, Path]) -> None:
    """fsync a folder, so renames into it are on disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)
