"""The DICOM node: receiver, worker and sender over one results folder, started and stopped together.

Results folder layout: `model.json` (which model owns the folder), `results.jsonl|csv` (the
rows, also the ledger), `spool/` (received, not yet processed), `outbox/` (result objects not
yet confirmed by the PACS), `sent/` (confirmed, kept `keep_sent_days`), `failed/` (not stored, with
`failed.log` saying why).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pneumoedge.pacs import report
from pneumoedge.pacs.ledger import Ledger, find_results, results_file
from pneumoedge.pacs.receive import Receiver
from pneumoedge.pacs.send import Destination, Outbox, Sender, echo
from pneumoedge.pacs.spool import Spool, write_durably
from pneumoedge.pacs.worker import Worker
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.results import OutputError

log = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    out: Path
    aet: str = "PNEUMOEDGE"
    host: str = "127.0.0.1"
    port: int = 11112
    fmt: str = "jsonl"
    #: Calling AE titles (`AET` or `AET@address`, or `receive.Peer`s) let in; empty: any.
    allow: Sequence[Any] = ()
    send_to: Optional[Destination] = None
    heatmaps: bool = False
    retry_max: float = 60.0
    batch_size: int = 8
    #: Days confirmed result objects stay in sent/ (None: forever; 0: removed once confirmed).
    keep_sent_days: Optional[float] = 30.0
    #: Failed attempts to store one object before it moves to failed/.
    max_attempts: int = 8


def _claim_folder(out: Path, identity: report.ModelIdentity) -> None:
    """One results folder, one model: its rows are the ledger of what that model has done.

    (Another model's rows would make this one skip those instances as duplicates.)
    """
    marker = out / "model.json"
    mine = {"name": identity.name, "members": [list(m) for m in identity.members]}
    if marker.exists():
        try:
            theirs = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            theirs = None
        if theirs != mine:
            name = theirs.get("name", "?") if isinstance(theirs, dict) else "?"
            raise OutputError(f"{out} holds the results of another model ({name}, other member files); use another --out folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_durably(out, marker.name, (json.dumps(mine, indent=2) + "\n").encode())


class Node:
    """`start()` opens the folder and listens; `stop()` finishes the current batch and releases the port."""

    def __init__(self, ensemble: Ensemble, config: NodeConfig) -> None:
        self.ensemble = ensemble
        self.config = config
        out = Path(config.out)
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out} is a file; --out takes a folder for results, spool and outbox")
        existing = find_results(out) if out.is_dir() else None
        if existing is not None and existing.suffix != f".{config.fmt}":
            raise OutputError(f"{out} already holds {existing.name}; use --format {existing.suffix[1:]} or another --out folder")
        _claim_folder(out, report.model_identity(ensemble))
        self.spool = Spool(out / "spool")
        self.outbox = Outbox(out, max_attempts=config.max_attempts)
        self.ledger = Ledger(results_file(out, config.fmt), config.fmt, ensemble.labels, [m.name for m in ensemble.members])
        self.worker = Worker(ensemble, self.spool, self.ledger, self.outbox, heatmaps=config.heatmaps, batch_size=config.batch_size)
        self.receiver = Receiver(self.spool, aet=config.aet, host=config.host, port=config.port, allow=config.allow)
        self.sender = (
            Sender(self.outbox, config.send_to, config.aet, retry_max=config.retry_max, keep_sent_days=config.keep_sent_days)
            if config.send_to
            else None
        )
        self._worker_thread: Optional[threading.Thread] = None
        self.started = 0.0
        self.leftover = 0

    def start(self) -> None:
        report.warm_up(self.ensemble)
        done = self.ledger.open()
        self.leftover = len(self.spool)
        log.info(
            "results %s (%d instances done before), %d left in the spool (processed first), %d objects in the outbox",
            self.ledger.path, len(done), self.leftover, len(self.outbox.pending()),
        )
        try:
            self.receiver.start()
        except OSError:
            self.ledger.close()
            raise
        self.started = time.monotonic()
        self._worker_thread = threading.Thread(target=self.worker.run, name="pneumoedge-worker", daemon=True)
        self._worker_thread.start()
        if self.sender is not None:
            self.sender.start()
        log.info(
            "listening as %s on %s:%d; transfer syntaxes %s", self.config.aet, self.config.host, self.receiver.bound_port,
            ", ".join(self.receiver.transfer_syntaxes),
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop receiving, let the worker finish its batch, stop the sender; results stay on disk."""
        self.receiver.stop()
        self.worker.stop()
        if self._worker_thread is not None:
            self._worker_thread.join(timeout)
        if self.sender is not None:
            self.sender.stop()
            self.sender.join(timeout)
        self.ledger.close()

    def run_until_signal(self, announce: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """After `start()`: run until SIGTERM or SIGINT, then `stop()`; return the summary.

        `announce` runs once the signals are caught (the CLI says where the node listens).
        """
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("%s received: finishing the current batch", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        announce()
        while not stop.wait(0.5):
            pass
        self.stop()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        stats = self.worker.stats
        sent = self.sender.stats if self.sender is not None else None
        return {
            "received": self.receiver.received,
            "refused_on_receipt": self.receiver.refused,
            "ok": stats.statuses["ok"],
            "skipped": stats.statuses["skipped"],
            "errors": stats.statuses["error"],
            "duplicates": stats.duplicates,
            "labels": dict(stats.labels),
            "objects_sent": sent.sent if sent else 0,
            "objects_failed": len(self.outbox.failed_files()),
            "associations_refused": self.receiver.refused_associations,
            "outbox": len(self.outbox.pending()),
            "spool": len(self.spool),
            "uptime_s": time.monotonic() - self.started if self.started else 0.0,
            "classify_s": stats.classify_s,
            "report_s": stats.report_s,
            "results": str(self.ledger.path),
            "last_send_error": sent.last_error if sent else "",
        }


def check_setup(config: NodeConfig, say: Callable[[str], None]) -> None:
    """`listen --check` after the model loaded: `say` one line per check passed.

    Raises OutputError at the first local problem (folder not writable, port taken), SendError
    when --send-to does not answer a C-ECHO.
    """
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pneumoedge-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"results folder {out} is not writable: {exc.strerror or exc}") from None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError as exc:
            raise OutputError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    say(f"ok: model loaded, {out} writable, {config.host}:{config.port} free")
    if config.send_to is None:
        say("ok: no --send-to: results stay in the outbox (send them with `pneumoedge send-results`)")
        return
    echo(config.send_to, config.aet)
    say(f"ok: C-ECHO to {config.send_to} answered, Comprehensive SR accepted")
