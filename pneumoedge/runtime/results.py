"""Result files (CSV or JSONL) written one whole line per system call, and resumable."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from pneumoedge.atomic import write_atomic
from pneumoedge.runtime.prediction import Prediction

FORMATS = ("csv", "jsonl")
#: Rows with these statuses are final; a resumed run redoes the others (errors may be transient).
FINAL_STATUSES = ("ok", "skipped")


class OutputError(RuntimeError):
    """The result file cannot be written as asked (exists, unreadable, from another model)."""


def csv_columns(labels: Sequence[str], members: Sequence[str]) -> list[str]:
    columns = ["path", "status", "label", "probability"]
    columns += [f"p_{label}" for label in labels]
    columns += ["disagreement", "threshold", "provider", "ood", "ood_score", "overlay"]
    columns += [f"member.{member}.p_{label}" for member in members for label in labels]
    columns.append("error")
    return columns


def _csv_row(prediction: Prediction, labels: Sequence[str], members: Sequence[str]) -> list[Any]:
    def fmt(value: Optional[float]) -> str:
        return "" if value is None else f"{value:.6f}"

    # One physical line per row, so a resumed run can split the file on newlines.
    row = [_one_line(prediction.source), prediction.status, prediction.label or "", fmt(prediction.probability)]
    row += [fmt(prediction.probabilities.get(label)) for label in labels]
    row += [fmt(prediction.disagreement), fmt(prediction.threshold), prediction.provider or ""]
    row += ["" if prediction.ood is None else str(prediction.ood).lower(), fmt(prediction.ood_score), _one_line(prediction.overlay_path)]
    row += [fmt(prediction.member_probabilities.get(m, {}).get(label)) for m in members for label in labels]
    row.append(_one_line(prediction.error))
    return row


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class ResultWriter:
    """Writes predictions to a file (or stdout), one complete line per `os.write`.

    A process killed mid-run leaves at most the lines it finished: a line is never split,
    so `--resume` can trust every line it reads back.
    """

    def __init__(self, fmt: str, labels: Sequence[str], members: Sequence[str], extra_columns: Sequence[str] = ()) -> None:
        if fmt not in FORMATS:
            raise OutputError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.labels = list(labels)
        self.members = list(members)
        #: Columns after infer's (e.g. the DICOM node's UIDs); `write(..., extra=)` fills them.
        self.extra_columns = list(extra_columns)
        self._fd: Optional[int] = None
        self._stream: Optional[Any] = None

    @property
    def header(self) -> Optional[str]:
        return _csv_line(csv_columns(self.labels, self.members) + self.extra_columns) if self.fmt == "csv" else None

    def open(self, path: Optional[Path], *, overwrite: bool = False, resume: bool = False) -> set[str]:
        """Open the output; return the paths already finished (with `resume`)."""
        if path is None:
            self._stream = sys.stdout
            if self.header:
                self._write(self.header)
            return set()
        done: set[str] = set()
        if path.exists() and path.is_dir():
            raise OutputError(f"{path} is a folder; give a file name for the results")
        if path.exists() and path.stat().st_size > 0:
            if resume:
                done = self._prepare_resume(path)
            elif not overwrite:
                raise OutputError(f"{path} already exists; use --overwrite to replace it or --resume to finish it")
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if done else os.O_TRUNC)
        self._fd = os.open(path, flags, 0o644)
        if not done and self.header:
            self._write(self.header)
        return done

    def open_append(self, path: Path, *, header: bool) -> None:
        """Append to `path` as it is (its owner read back and checked what it holds); `header`: write the CSV header first."""
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if header and self.header:
            self._write(self.header)

    def sync(self) -> None:
        """fsync the output file: the rows written so far survive a power cut."""
        if self._fd is not None:
            os.fsync(self._fd)

    def _prepare_resume(self, path: Path) -> set[str]:
        """Keep the finished rows of an earlier run, drop the rest, rewrite atomically."""
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        complete = lines[:-1]  # the last element is "" or a line cut short by a crash
        kept: list[str] = []
        done: set[str] = set()
        if self.fmt == "csv":
            if not complete or complete[0] + "\n" != self.header:
                raise OutputError(
                    f"{path}: its columns differ from this run's (another model or labels?); "
                    "cannot resume it: use another --out or --overwrite"
                )
            kept.append(complete[0])
            for line in complete[1:]:
                fields = next(csv.reader([line]), [])
                if len(fields) >= 2 and fields[1] in FINAL_STATUSES:
                    kept.append(line)
                    done.add(fields[0])
        else:
            for line in complete:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("status") in FINAL_STATUSES:
                    kept.append(line)
                    done.add(str(record.get("path")))
        write_atomic(path, "".join(line + "\n" for line in kept))
        return done

    def write(self, prediction: Prediction, extra: Optional[dict[str, Any]] = None) -> None:
        values = [(column, (extra or {}).get(column, "")) for column in self.extra_columns]
        if self.fmt == "csv":
            row = _csv_row(prediction, self.labels, self.members) + [_one_line(str(value)) for _, value in values]
            self._write(_csv_line(row))
        else:
            self._write(json.dumps({**prediction.to_dict(), **dict(values)}, ensure_ascii=False) + "\n")

    def _write(self, line: str) -> None:
        if self._stream is not None:
            self._stream.write(line)
            self._stream.flush()
            return
        assert self._fd is not None, "open() first"
        data = line.encode("utf-8")
        while data:  # os.write may write less than asked only on pipes/signals
            written = os.write(self._fd, data)
            data = data[written:]

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        self._fd = None
        self._stream = None


def _csv_line(fields: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue()
