"""Sending result objects to a PACS: C-ECHO, and C-STORE from an on-disk outbox with back-off.

Objects wait in `outbox/` until the PACS confirms them; then they move to `sent/` (kept for
`--keep-sent` days, so `send-results --all` can send them again: their UIDs are fixed, so the
PACS keeps one copy). Each answer is classified by its DICOM status class (PS3.7 Annex C):
success and warning are stored; a failure the same object will meet again (data set does
not match the class, cannot understand, class not supported, not authorised, ...) moves it
at once to `failed/`, with the reason in `failed/failed.log`; a failure that may pass (out of
resources, processing failure, no answer) leaves it in the outbox for the next pass, at most
`max_attempts` times, then it too moves to `failed/`. A failing object never holds up the
ones behind it. A PACS that cannot be reached at all is not any object's fault: nothing is
counted, and everything waits with a growing pause, so an outage loses nothing.
`send-results --retry-failed` sends `failed/` again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pneumoedge.atomic import sync_folder
from pneumoedge.pacs.spool import Spool, key_of

log = logging.getLogger(__name__)

_DEST = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22")  # Comprehensive, Enhanced SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: Failure statuses that may pass when the same object is sent later (PS3.4 B.2.3, PS3.7 C):
#: out of resources (A7xx), processing failure, duplicate invocation, resource limitation.
_TRANSIENT = (0x0110, 0x0210, 0x0213)
#: Warnings that still mean "stored" besides the Bxxx class (PS3.7 C.4), and 0x0111 (an
#: instance with this UID is already there: our UIDs are fixed, so it is ours).
_STORED = (0x0001, 0x0107, 0x0116, 0x0111)
MAX_ATTEMPTS = 8
FAILED_LOG = "failed.log"


def classify_status(code: Optional[int]) -> str:
    """"stored", "transient" or "permanent" for a C-STORE response status (None: no answer).

    Success (0000) and the warning class (Bxxx, 0001, 0107, 0116) are stored. Failures of
    class A7xx (out of resources) and 0110/0210/0213 may pass, as may no answer (timeout,
    abort) and Cancel (FE00); every other failure (A9xx data set does not match the class,
    Cxxx cannot understand, 0122 class not supported, 0124 not authorised, 01xx/02xx
    attribute errors) will be met again by the same object.
    """
    if code is None or code == 0xFE00:
        return "transient"
    if code == 0x0000 or code & 0xF000 == 0xB000 or code in _STORED:
        return "stored"
    if code & 0xFF00 == 0xA700 or code in _TRANSIENT:
        return "transient"
    return "permanent"


class SendError(RuntimeError):
    """A destination that cannot be reached or refuses us; the message is one line."""


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """`AET@host:port` (e.g. ORTHANC@127.0.0.1:4242) to a Destination; ValueError with the reason."""
    match = _DEST.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536 or not match["aet"].strip():
        raise ValueError(f"{text!r} is not a DICOM node: write AET@host:port, e.g. ORTHANC@127.0.0.1:4242 (AE title up to 16 characters)")
    return Destination(match["aet"].strip(), match["host"], int(match["port"]))


def _application_entity(calling_aet: str, timeout: float):
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in (*SR_CLASSES, SC_CLASS):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    return ae


def _associate(destination: Destination, calling_aet: str, timeout: float):
    ae = _application_entity(calling_aet, timeout)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.aet)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise SendError(f"{destination} rejected the association (is {calling_aet!r} a known AE title there, and {destination.aet!r} its own?)")
    if assoc.is_aborted and _answers(destination):
        raise SendError(f"{destination} aborted the association")
    raise SendError(f"cannot connect to {destination} (nothing answers on {destination.host}:{destination.port})")


def _answers(destination: Destination) -> bool:
    """Whether anything accepts TCP connections there (pynetdicom reports a refused connection as an abort)."""
    try:
        socket.create_connection((destination.host, destination.port), timeout=5).close()
        return True
    except OSError:
        return False


def echo(destination: Destination, calling_aet: str, timeout: float = 10.0) -> None:
    """C-ECHO the destination; SendError with the reason in one line when it does not answer."""
    assoc = _associate(destination, calling_aet, timeout)
    try:
        status = assoc.send_c_echo()
        if not status or status.get("Status") != 0x0000:
            raise SendError(f"{destination} did not confirm the C-ECHO (status {_status_text(status)})")
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        missing = [uid for uid in (SR_CLASSES[0],) if uid not in accepted]
        if missing:
            raise SendError(f"{destination} answers but does not accept Comprehensive SR objects")
    finally:
        assoc.release()


def _status_text(status) -> str:
    return "none (timeout or abort)" if not status or "Status" not in status else f"0x{int(status.Status):04X}"


@dataclass
class SendStats:
    sent: int = 0
    failed: int = 0
    failures: int = 0
    last_error: str = ""
    sent_uids: list = field(default_factory=list)


class Outbox:
    """The on-disk queue of result objects and the folders they move to."""

    def __init__(self, root: Path, *, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.root = Path(root)
        self.queue = Spool(self.root / "outbox")
        self.sent = self.root / "sent"
        self.failed = self.root / "failed"
        for folder in (self.sent, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        #: Failed attempts per outbox file name in this process (a restart starts the count again).
        self.attempts: dict[str, int] = {}
        self._log_lock = threading.Lock()

    def put(self, sop_uid: str, data: bytes) -> Path:
        """Queue an object; an older copy of the same object (left by a crash) is replaced."""
        earlier = [p for p in self.queue.pending() if key_of(p) == sop_uid]
        path = self.queue.put(sop_uid, data)
        for old in earlier:
            old.unlink(missing_ok=True)
        return path

    def pending(self) -> list[Path]:
        return self.queue.pending()

    def failed_files(self) -> list[Path]:
        return sorted(p for p in self.failed.glob("*.dcm") if not p.name.startswith("."))

    def _move(self, path: Path, folder: Path) -> None:
        try:
            os.replace(path, folder / path.name)
        except FileNotFoundError:  # replaced by a newer copy meanwhile (see put)
            return
        if folder == self.sent:
            os.utime(folder / path.name)  # the retention clock starts at confirmation
        sync_folder(folder)

    def _fail(self, path: Path, destination: Destination, reason: str, stats: SendStats) -> None:
        """Move an object aside to failed/ and say why there (one line per event in failed/failed.log)."""
        if path.parent != self.failed:
            self._move(path, self.failed)
        self.attempts.pop(path.name, None)
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        line = f"{stamp} {path.name} {destination}: {reason}\n"
        with self._log_lock, open(self.failed / FAILED_LOG, "a", encoding="utf-8") as handle:
            handle.write(line)
        stats.failed += 1
        log.error("%s: %s not stored: %s; moved to %s (send-results --retry-failed sends it again)", destination, _uid_of(path), reason, self.failed)

    def prune_sent(self, keep_days: Optional[float]) -> int:
        """Remove confirmed objects older than `keep_days` from sent/ (None: keep them all); return how many."""
        if keep_days is None:
            return 0
        limit = time.time() - keep_days * 86400.0
        removed = 0
        for path in self.sent.glob("*.dcm"):
            try:
                if path.stat().st_mtime <= limit:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d confirmed result object(s) older than %g day(s) from %s", removed, keep_days, self.sent)
        return removed

    def send_pending(
        self,
        destination: Destination,
        calling_aet: str,
        *,
        stats: SendStats,
        files: Optional[list[Path]] = None,
        stop: Callable[[], bool] = lambda: False,
        timeout: float = 30.0,
    ) -> bool:
        """Send `files` (default: the queue) over one association; True when every one was stored.

        Objects that fail are classified (see `classify_status`) and the pass goes on with the
        next one. Raises SendError when the destination cannot be reached, or stops answering
        (the files stay where they are).
        """
        files = self.pending() if files is None else files
        if not files:
            return True
        assoc = _associate(destination, calling_aet, timeout)
        complete = True
        try:
            for path in files:
                if stop():
                    return False
                try:
                    status = assoc.send_c_store(path)
                except FileNotFoundError:  # moved meanwhile by another sender (a running listener)
                    continue
                code = int(status.Status) if status and "Status" in status else None
                verdict = classify_status(code)
                if verdict == "stored":
                    if path.parent in (self.queue.folder, self.failed):
                        self._move(path, self.sent)
                    self.attempts.pop(path.name, None)
                    stats.sent += 1
                    stats.sent_uids.append(path.name)
                    log.info("sent %s to %s", _uid_of(path), destination)
                    continue
                complete = False
                stats.failures += 1
                text = _status_text(status) + _comment(status)
                if verdict == "permanent":
                    self._fail(path, destination, f"refused with status {text}, which sending again will not change", stats)
                    continue
                attempts = self.attempts.get(path.name, 0) + 1
                self.attempts[path.name] = attempts
                stats.last_error = f"{destination} did not store {_uid_of(path)} (status {text}; attempt {attempts} of {self.max_attempts})"
                if attempts >= self.max_attempts and path.parent != self.failed:
                    self._fail(path, destination, f"not stored after {attempts} attempts (last status {text})", stats)
                else:
                    log.warning("%s", stats.last_error)
                if code is None or not assoc.is_established:  # no answer: the association is gone, back off
                    raise SendError(stats.last_error)
        finally:
            if assoc.is_established:
                assoc.release()
        return complete


def _comment(status) -> str:
    comment = str(status.get("ErrorComment", "") or "").strip() if status else ""
    return f" {comment!r}" if comment else ""


def _uid_of(path: Path) -> str:
    return key_of(path)


class Sender(threading.Thread):
    """Sends the outbox in the background; after a pass with failures waits 1, 2, 4 ... `retry_max` seconds.

    Every hour (and at start) removes confirmed objects older than `keep_sent_days` from sent/.
    """

    def __init__(
        self,
        outbox: Outbox,
        destination: Destination,
        calling_aet: str,
        *,
        retry_max: float = 60.0,
        keep_sent_days: Optional[float] = None,
    ) -> None:
        super().__init__(name="pneumoedge-send", daemon=True)
        self.outbox = outbox
        self.destination = destination
        self.calling_aet = calling_aet
        self.retry_max = retry_max
        self.keep_sent_days = keep_sent_days
        self.stats = SendStats()
        self._stop_event = threading.Event()
        self._pruned = 0.0

    def stop(self) -> None:
        self._stop_event.set()
        self.outbox.queue.wake()

    def _prune(self) -> None:
        if time.monotonic() - self._pruned >= 3600.0 or not self._pruned:
            self._pruned = time.monotonic()
            try:
                self.outbox.prune_sent(self.keep_sent_days)
            except OSError as exc:
                log.error("cannot prune %s: %s", self.outbox.sent, exc)

    def run(self) -> None:
        delay = 1.0
        while not self._stop_event.is_set():
            self._prune()
            if not self.outbox.pending():
                self.outbox.queue.wait(1.0)
                continue
            try:
                if self.outbox.send_pending(self.destination, self.calling_aet, stats=self.stats, stop=self._stop_event.is_set):
                    delay = 1.0
                    continue
                waiting = len(self.outbox.pending())
                if waiting:
                    log.warning("%d result object(s) not stored yet; next attempt in %.0f s", waiting, delay)
            except SendError as exc:
                self.stats.last_error = str(exc)
                log.warning("%s; %d result object(s) kept in the outbox, retrying in %.0f s", exc, len(self.outbox.pending()), delay)
            except Exception as exc:  # noqa: BLE001 - a vanished or unreadable file, a full disk: report, keep going
                self.stats.last_error = str(exc)
                log.error("outbox: %s; retrying in %.0f s", exc, delay)
            self._stop_event.wait(delay)
            delay = min(delay * 2, self.retry_max)
