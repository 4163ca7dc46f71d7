"""The Storage SCP: accept projection radiographs, spool each one durably, then acknowledge.

The C-STORE handler does one thing: write the instance as it arrived (no decoding) to the
spool, fsynced and renamed, and only then answer success. Classification happens in the
worker; a PACS that heard "success" can forget the image, pneumoedge will not lose it.
"""

from __future__ import annotations

import logging
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
#: Compressed syntaxes offered only when an installed pydicom decoder can read them.
_COMPRESSED = (
    "1.2.840.10008.1.2.5",  # RLE Lossless (pydicom's own)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (needs pylibjpeg-libjpeg or GDCM)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit by definition)
)
# Not JPEG Extended (1.2.840.10008.1.2.4.51): pydicom calls its Pillow decoder available, but
# Pillow reads only 8-bit ones, and 12-bit ones are what CR/DX hold (tried with Orthanc's
# transcoder). Left out, a PACS converts them to a syntax offered here.
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000


def decodable_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one an installed decoder can read (checked now)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    found = list(_UNCOMPRESSED)
    for uid in _COMPRESSED:
        try:
            if get_decoder(UID(uid)).is_available:
                found.append(uid)
        except NotImplementedError:
            continue
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


class Receiver:
    """A Storage SCP with C-ECHO writing into `spool`; `start()` returns once it listens."""

    def __init__(
        self, spool: Spool, *, aet: str, host: str, port: int, allow: Optional[Sequence[str]] = None, max_pdu: int = 0
    ) -> None:
        self.spool = spool
        self.aet, self.host, self.port = aet, host, port
        self.allow = [a.strip() for a in allow or () if a.strip()]
        self.max_pdu = max_pdu
        self.received = 0
        self.refused = 0
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

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "refused an association from %s (%s): %s", requestor.ae_title.strip() or "?", requestor.address,
            "not in --allow" if self.allow else "rejected",
        )

    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = self.max_pdu
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, self.transfer_syntaxes)
        ae.add_supported_context(VERIFICATION)
        if self.allow:
            ae.require_calling_aet = self.allow
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._on_rejected)]
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
