"""The node's results file, which is also its ledger: a row per SOP Instance UID, written once.

A row is the commit point of an instance: its SR is in the outbox before the row is
written, and its spool file is removed after. On start the file is read back; instances
with a row are never processed again, so a restart after `kill -9` duplicates nothing.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from pneumoedge.runtime.ensemble import Prediction
from pneumoedge.runtime.results import OutputError, ResultWriter

#: Columns the node adds after infer's.
EXTRA_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "calling_ae", "received", "sr")
UID_COLUMN = "SOPInstanceUID"


class Ledger:
    """Appends result rows (one `os.write` each) and knows which instances have one."""

    def __init__(self, path: Path, fmt: str, labels: Sequence[str], members: Sequence[str]) -> None:
        self.path = Path(path)
        self.writer = ResultWriter(fmt, labels, members, extra_columns=EXTRA_COLUMNS)
        self.done: set[str] = set()

    def open(self) -> set[str]:
        """Open for appending; repair a line cut short by a crash; return the UIDs already done."""
        if self.path.is_dir():
            raise OutputError(f"{self.path} is a folder; the results file must be a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = self.path.exists() and self.path.stat().st_size > 0
        if existing:
            self.done = self._read_back()
        self.writer.open_append(self.path, header=not existing)  # the writer's one-line-per-write discipline
        return set(self.done)

    def _read_back(self) -> set[str]:
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):  # a row cut short by a crash: not committed, so drop it
            os.truncate(self.path, cut)
        lines = data[:cut].decode("utf-8", errors="replace").splitlines()
        done: set[str] = set()
        if self.writer.fmt == "csv":
            if not lines or lines[0] + "\n" != self.writer.header:
                raise OutputError(
                    f"{self.path}: its columns differ from this model's (another model or labels?); use another --out folder"
                )
            index = next(csv.reader([lines[0]])).index(UID_COLUMN)
            for fields in csv.reader(lines[1:]):
                if len(fields) > index and fields[index]:
                    done.add(fields[index])
        else:
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get(UID_COLUMN):
                    done.add(str(record[UID_COLUMN]))
        return done

    def __contains__(self, sop_uid: str) -> bool:
        return sop_uid in self.done

    def write(self, prediction: Prediction, extra: dict[str, Any]) -> None:
        """Append the row and fsync it: the spool file is removed next, so the row must survive a power cut."""
        self.writer.write(prediction, extra)
        self.writer.sync()
        if extra.get(UID_COLUMN):
            self.done.add(str(extra[UID_COLUMN]))

    def close(self) -> None:
        self.writer.close()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a node's results file (CSV or JSONL), as dicts."""
    text = Path(path).read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def results_file(folder: Path, fmt: str) -> Path:
    return Path(folder) / f"results.{fmt}"


def find_results(folder: Path) -> Optional[Path]:
    for fmt in ("jsonl", "csv"):
        candidate = results_file(folder, fmt)
        if candidate.exists():
            return candidate
    return None
