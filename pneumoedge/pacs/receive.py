"""The Storage SCP: accept projection radiographs, spool each one durably, then acknowledge.

The C-STORE handler does one thing: write the instance as it arrived (no decoding) to the
spool, fsynced and renamed, and only then answer success. Classification happens in the
worker; a PACS that heard "success" can forget the image, pneumoedge will not lose it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pneumoedge.pacs.spool import Spool

log = logging.getLogger(__name__)

#: Projection radiography classes. Secondary Capture is left out on purpose: it holds
#: screenshots and derived images (our own overlays among them), not acquisitions.
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
VERIFICATION = "1.2.840.10008.1.1"
#: Explicit and implicit VR little endian. Explicit big endian (retired in 2004) is left out: a
#: sender that has it converts, and nothing here has to trust an untested byte-swapping path.
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
#: Compressed syntaxes offered, each with the pydicom decoder plugins that are tested with it
#: here (tests/test_pacs_*.py decode what Orthanc writes in them, 8- and 12-bit). A syntax is
#: offered only when one of its tested plugins is installed; pydicom calling some other plugin
#: "available" is not enough (Pillow's OpenJPEG refuses valid JPEG 2000 files that are then
#: acknowledged and lost to an error row). Not offered, a PACS converts to what is.
TESTED_DECODERS = {
    "1.2.840.10008.1.2.5": ("pydicom",),  # RLE Lossless: pydicom's own
    "1.2.840.10008.1.2.4.80": ("pyjpegls",),  # JPEG-LS Lossless (pyjpegls comes with highdicom)
    "1.2.840.10008.1.2.4.81": ("pyjpegls",),  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.50": ("pillow",),  # JPEG Baseline (8-bit by definition)
}
# Not JPEG Extended (1.2.840.10008.1.2.4.51): Pillow reads only 8-bit ones, CR/DX hold 12-bit.
# Not JPEG Lossless (.4.57, .4.70) nor JPEG 2000 (.4.90, .4.91): no decoder for them is tested
# here (pylibjpeg-libjpeg / pylibjpeg-openjpeg / python-gdcm are not in the pacs extra).
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000


def decodable_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one whose tested decoder is installed (checked now)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    found = list(_UNCOMPRESSED)
    for uid, tested in TESTED_DECODERS.items():
        try:
            installed = set(get_decoder(UID(uid)).available_plugins)
        except NotImplementedError:
            continue
        if installed & set(tested):
            found.append(uid)
    return found


def _instance_bytes(event: Any) -> tuple[str, bytes]:
    """(SOP Instance UID, the instance as a DICOM file) without decoding its data set.

    The calling AE title goes into the file meta's Source Application Entity Title, which is
    what that element is for, so the spool file alone says where the image came from.
    """
    from pynetdicom.dsutils import encode_file_meta

    meta = event.file_meta
    meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title.strip()[:16]
    data = event.encoded_dataset(include_meta=False)
    return str(meta.MediaStorageSOPInstanceUID), b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), data))


@dataclass(frozen=True)
class Peer:
    """One `--allow` entry: a calling AE title, and the addresses it may call from (None: any)."""

    aet: str
    addresses: Optional[frozenset] = None

    def admits(self, aet: str, address: str) -> bool:
        return aet == self.aet and (self.addresses is None or address in self.addresses)


def parse_allow(entries: Sequence[str]) -> list[Peer]:
    """`AET` or `AET@address` (a host name is resolved now) to Peers; ValueError with the reason."""
    peers = []
    for entry in entries:
        aet, _, where = entry.strip().partition("@")
        aet = aet.strip()
        if not aet or len(aet) > 16 or "\\" in aet:
            raise ValueError(f"{entry!r}: write AET or AET@address (an AE title is 1 to 16 characters)")
        if not where:
            peers.append(Peer(aet))
            continue
        try:
            found = {info[4][0] for info in socket.getaddrinfo(where.strip(), None, proto=socket.IPPROTO_TCP)}
        except OSError as exc:
            raise ValueError(f"{entry!r}: cannot resolve {where!r} ({exc.strerror or exc})") from None
        peers.append(Peer(aet, frozenset(found)))
    return peers


class Receiver:
    """A Storage SCP with C-ECHO writing into `spool`; `start()` returns once it listens.

    Associations are refused when the called AE title is not `aet`, and, with `allow`, when
    the calling AE title (and address, where given) is not in it.
    """

    def __init__(
        self, spool: Spool, *, aet: str, host: str, port: int, allow: Optional[Sequence[Any]] = None, max_pdu: int = 0
    ) -> None:
        self.spool = spool
        self.aet, self.host, self.port = aet, host, port
        self.allow = [p if isinstance(p, Peer) else parse_allow([p])[0] for p in allow or () if str(getattr(p, "aet", p)).strip()]
        self.max_pdu = max_pdu
        self.received = 0
        self.refused = 0
        self.refused_associations = 0
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self._server: Any = None

    def _handle_store(self, event: Any) -> int:
        try:
            uid, data = _instance_bytes(event)
        except Exception as exc:  # noqa: BLE001 - a malformed request is answered, not raised into pynetdicom
            log.error("refused an instance whose header cannot be read: %s", exc)
            self.refused += 1
            return _CANNOT_UNDERSTAND
        try:
            self.spool.put(uid, data)
        except OSError as exc:  # disk full or read-only: say so, the PACS keeps the image and retries
            log.error("cannot spool %s: %s", uid, exc)
            self.refused += 1
            return _OUT_OF_RESOURCES
        self.received += 1
        log.info("received %s from %s", uid, event.assoc.requestor.ae_title.strip())
        return 0x0000

    def _on_requested(self, event: Any) -> None:
        """Refuse, before anything is negotiated, a calling AE title or address not in --allow."""
        if not self.allow:
            return
        requestor = event.assoc.requestor
        calling = str(requestor.primitive.calling_ae_title).strip() if requestor.primitive else ""
        if not any(peer.admits(calling, requestor.address) for peer in self.allow):
            log.warning("refused an association from %s (%s): not in --allow", calling or "?", requestor.address)
            self.refused_associations += 1
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected permanent: calling AE title not recognised
            event.assoc.kill()  # as pynetdicom's own rejections do: the DUL sends the A-ASSOCIATE-RJ, then stops

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        request = requestor.primitive
        called = str(request.called_ae_title).strip() if request is not None and request.called_ae_title else ""
        self.refused_associations += 1
        why = f"it called AE title {called!r}, this node is {self.aet!r}" if called != self.aet else "too many associations"
        log.warning("refused an association from %s (%s): %s", requestor.ae_title.strip() or "?", requestor.address, why)

    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = self.max_pdu
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, self.transfer_syntaxes)
        ae.add_supported_context(VERIFICATION)
        ae.require_called_aet = True  # an association for another AE title is not for us
        handlers = [
            (evt.EVT_C_STORE, self._handle_store), (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected),
        ]
        # Raises OSError (address in use, permission) before anything is acknowledged.
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)

    @property
    def bound_port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self.port

    def stop(self) -> None:
        """Stop listening; associations in progress end (their unacknowledged instances are resent by the PACS)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
