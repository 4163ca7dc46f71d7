"""Sending result objects to a PACS: C-ECHO, and C-STORE from an on-disk outbox with back-off.

Objects wait in `outbox/` until the PACS confirms them; then they move to `sent/` (kept, so
`send-results --all` can send them again: their UIDs are fixed, so the PACS keeps one copy).
Objects the PACS refuses for good (unsupported class, bad data) move to `refused/` with a
log line; everything else is retried with a growing pause, so an outage loses nothing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pneumoedge.pacs.spool import Spool, key_of, sync_folder

log = logging.getLogger(__name__)

_DEST = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22")  # Comprehensive, Enhanced SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: Statuses that will not change by sending again (PS3.4 C.4.2.3 and annex B.2.3).
_PERMANENT = (0x0122, 0x0124, 0xC000)


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
    refused: int = 0
    failures: int = 0
    last_error: str = ""
    sent_uids: list = field(default_factory=list)


class Outbox:
    """The on-disk queue of result objects and the folders they move to."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.queue = Spool(self.root / "outbox")
        self.sent = self.root / "sent"
        self.refused = self.root / "refused"
        for folder in (self.sent, self.refused):
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, sop_uid: str, data: bytes) -> Path:
        """Queue an object; an older copy of the same object (left by a crash) is replaced."""
        earlier = [p for p in self.queue.pending() if key_of(p) == sop_uid]
        path = self.queue.put(sop_uid, data)
        for old in earlier:
            old.unlink(missing_ok=True)
        return path

    def pending(self) -> list[Path]:
        return self.queue.pending()

    def _move(self, path: Path, folder: Path) -> None:
        try:
            os.replace(path, folder / path.name)
        except FileNotFoundError:  # replaced by a newer copy meanwhile (see put)
            return
        sync_folder(folder)

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
        """Send `files` (default: the queue) over one association; False when stopped before the end.

        Raises SendError when the destination cannot be reached (nothing was lost: the files stay).
        """
        files = self.pending() if files is None else files
        if not files:
            return True
        assoc = _associate(destination, calling_aet, timeout)
        try:
            for path in files:
                if stop():
                    return False
                try:
                    status = assoc.send_c_store(path)
                except FileNotFoundError:  # moved meanwhile by another sender (a running listener)
                    continue
                code = int(status.Status) if status and "Status" in status else None
                if code is not None and (code == 0x0000 or code & 0xF000 == 0xB000):
                    if path.parent == self.queue.folder:
                        self._move(path, self.sent)
                    stats.sent += 1
                    stats.sent_uids.append(path.name)
                    log.info("sent %s to %s", _uid_of(path), destination)
                elif code in _PERMANENT:
                    self._move(path, self.refused)
                    stats.refused += 1
                    log.error("%s refused %s for good (status 0x%04X); kept in %s", destination, _uid_of(path), code, self.refused)
                else:
                    stats.failures += 1
                    raise SendError(f"{destination} did not store {_uid_of(path)} (status {_status_text(status)})")
        finally:
            if assoc.is_established:
                assoc.release()
        return True


def _uid_of(path: Path) -> str:
    return key_of(path)


class Sender(threading.Thread):
    """Sends the outbox in the background; on failure waits 1, 2, 4 ... `retry_max` seconds."""

    def __init__(self, outbox: Outbox, destination: Destination, calling_aet: str, *, retry_max: float = 60.0) -> None:
        super().__init__(name="pneumoedge-send", daemon=True)
        self.outbox = outbox
        self.destination = destination
        self.calling_aet = calling_aet
        self.retry_max = retry_max
        self.stats = SendStats()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.outbox.queue.wake()

    def run(self) -> None:
        delay = 1.0
        while not self._stop_event.is_set():
            if not self.outbox.pending():
                self.outbox.queue.wait(1.0)
                continue
            try:
                self.outbox.send_pending(self.destination, self.calling_aet, stats=self.stats, stop=self._stop_event.is_set)
                delay = 1.0
            except SendError as exc:
                self.stats.last_error = str(exc)
                log.warning("%s; %d result object(s) kept in the outbox, retrying in %.0f s", exc, len(self.outbox.pending()), delay)
                self._stop_event.wait(delay)
                delay = min(delay * 2, self.retry_max)
            except Exception as exc:  # noqa: BLE001 - a vanished or unreadable file, a full disk: report, keep going
                self.stats.last_error = str(exc)
                log.error("outbox: %s; retrying in %.0f s", exc, delay)
                self._stop_event.wait(delay)
                delay = min(delay * 2, self.retry_max)
