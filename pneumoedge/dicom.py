"""DICOM files to pixels, rendered the way a viewer displays them (needs pydicom: `pneumoedge[dicom]`).

Rendering, in the order of the DICOM standard's grayscale pipeline (PS3.3 C.11):
stored values (BitsStored honoured, sign extended by pydicom) -> modality LUT or rescale
slope/intercept -> the file's first VOI LUT, else its first window centre/width (LINEAR,
LINEAR_EXACT or SIGMOID), else the image's own min..max (always min..max with the spec's
`dicom_voi="min_max"`) -> MONOCHROME1 inverted, so that bone is bright as in MONOCHROME2
-> float32 in 0..255. Colour objects (RGB, YBR_* converted by pydicom, PALETTE COLOR
through its LUT) are scaled from their bit depth to 0..255.

The result is float32 0..255, not rounded to 8 bits: `preprocessing.to_float_pixels` takes it
as it is, whatever the spec's `high_bit_depth` says, for training and runtime alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import threading
import warnings
from typing import Any, Iterator

import numpy as np

from pneumoedge.formats import ImageError, bare_dicom_group, check_size

_INSTALL = "reading DICOM needs pydicom: pip install 'pneumoedge[dicom]'"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: How many leading bytes `sniff_dicom` needs to see a DICOMDIR's file meta (it is well under 1 KiB).
SNIFF_BYTES = 1024

#: Modalities of projection radiographs (chest X-rays among them): Computed and Digital Radiography.
RADIOGRAPH_MODALITIES = ("CR", "DX")


def not_a_radiograph(header: Any) -> str:
    """THE modality rule (`infer`, `serve`, `listen`): why this DICOM object is not a projection radiograph.

    "" when its Modality is CR or DX, OT ("other": digitised films) or absent (many exports
    leave it out; the pixels still go through every other check). Otherwise a one-line reason, e.g. "modality CT (computed
    tomography) is not a projection radiograph (CR or DX); this model classifies chest
    X-rays": a CT slice or an MR image would get a confident, meaningless label.
    `header` is any pydicom Dataset (pixels not needed).
    """
    modality = str(header.get("Modality", "") or "").strip().upper()
    if not modality or modality in RADIOGRAPH_MODALITIES or modality == "OT":
        return ""
    name = _MODALITY_NAMES.get(modality)
    shown = f"{modality} ({name})" if name else modality
    return f"modality {shown} is not a projection radiograph (CR or DX); this model classifies chest X-rays"


_MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "positron emission tomography", "MG": "mammography", "XA": "X-ray angiography",
    "RF": "fluoroscopy", "IO": "intra-oral radiography", "PX": "panoramic X-ray",
    "SC": "secondary capture", "SR": "structured report", "RTIMAGE": "radiotherapy image",
    "RTDOSE": "radiotherapy dose", "RTSTRUCT": "radiotherapy structures", "RTPLAN": "radiotherapy plan",
    "ES": "endoscopy", "XC": "external camera", "OP": "ophthalmic photography", "SM": "slide microscopy",
    "ECG": "electrocardiography", "PR": "presentation state", "KO": "key object selection", "SEG": "segmentation",
}


def sniff_dicom(head: bytes) -> str:
    """What the first bytes of a file say, by content only (no pydicom, never the file name).

    "dicomdir": a DICOMDIR (Media Storage SOP Class 1.2.840.10008.1.3.10 in its file meta, or a
    bare data set that starts with the directory's group 0004); "dicom": another DICOM file
    ("DICM" after the 128-byte preamble, or a bare data set that starts with a group 0002 or
    0008 element, little or big endian); "": not DICOM. `head`: at least `SNIFF_BYTES` bytes
    when the file has them.
    """
    if head[128:132] == b"DICM":
        return "dicomdir" if _meta_sop_class(head, 132) == _DICOMDIR_CLASS else "dicom"
    group = bare_dicom_group(head)
    if group == 0x0004:
        return "dicomdir"
    if group == 0x0002:
        return "dicomdir" if _meta_sop_class(head, 0) == _DICOMDIR_CLASS else "dicom"
    return "dicom" if group == 0x0008 else ""


def _meta_sop_class(head: bytes, at: int) -> str:
    """Media Storage SOP Class UID from the file meta (group 0002, explicit VR little endian) at `at`."""
    while at + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, at)
        if group != 0x0002:
            return ""
        vr = head[at + 4 : at + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if at + 12 > len(head):
                return ""
            length, at = struct.unpack_from("<I", head, at + 8)[0], at + 12
        else:
            length, at = struct.unpack_from("<H", head, at + 6)[0], at + 8
        if element == 0x0002:
            return head[at : at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        at += length
    return ""


_local = threading.local()
_hooks_lock = threading.Lock()
_hooked = False


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[list[str]]:
    """Collect what pydicom logs and warns in this thread (once each, no tracebacks) instead of printing it.

    pydicom reports a file's oddities twice (its logger and `warnings`) and logs a decoder's
    traceback; for pneumoedge they belong in that file's row, not on the terminal. The
    messages go to the yielded list. Outside this context pydicom behaves as usual. Thread-safe:
    the collection is per thread, the hooks are installed once.
    """
    _install_hooks()
    previous = getattr(_local, "notes", None)
    notes: list[str] = []
    _local.notes = notes
    try:
        yield notes
    finally:
        _local.notes = previous


def _note(message: str) -> bool:
    """Add `message` to this thread's collection; False when none is active."""
    notes = getattr(_local, "notes", None)
    if notes is None:
        return False
    text = " ".join(str(message).split())
    if text and text not in notes:
        notes.append(text)
    return True


class _PydicomRelay(logging.Handler):
    """On the "pydicom" logger: collects while `quiet_pydicom` is active, else passes records on as usual."""

    def emit(self, record: logging.LogRecord) -> None:
        if _note(record.getMessage()):
            return
        for handler in logging.getLogger().handlers:  # what propagation to the root would have done
            if record.levelno >= handler.level:
                handler.handle(record)


def _install_hooks() -> None:
    global _hooked
    with _hooks_lock:
        if _hooked:
            return
        logger = logging.getLogger("pydicom")
        logger.addHandler(_PydicomRelay())
        logger.propagate = False
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if not _note(str(message)):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        _hooked = True


def _with_notes(reason: str, notes: list[str]) -> str:
    extra = [n for n in notes if n not in reason]
    return f"{reason} (pydicom: {'; '.join(extra)})" if extra else reason


def decode_dicom(data: bytes, *, max_pixels: int, voi: str = "file") -> np.ndarray:
    """Render a single-frame DICOM image to float32 0..255, (H, W) gray or (H, W, 3) RGB.

    `voi`: "file" renders through the file's VOI LUT or window (else min..max); "min_max"
    ignores them and stretches the modality values' min..max.

    Raises `ImageError` for anything that is not one decodable image, with the reason.
    """
    try:
        import pydicom
    except ImportError:
        raise ImageError(f"this is a DICOM file, and {_INSTALL}") from None
    with quiet_pydicom() as notes:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            _ensure_transfer_syntax(ds)
            _check_single_image(ds, max_pixels)
        except ImageError as exc:
            raise ImageError(_with_notes(str(exc), notes)) from None
        # pydicom parses untrusted bytes and raises many types on a corrupt file (ValueError,
        # KeyError, struct.error, ...): each is a per-file problem to report, never a crash of the run.
        except Exception as exc:  # noqa: BLE001
            raise ImageError(_with_notes(f"cannot read the DICOM file: {_short(exc)}", notes)) from None
        try:
            stored = np.asarray(ds.pixel_array)
        except Exception as exc:  # noqa: BLE001 - a decoder's failure, named with what else could decode it
            raise ImageError(_with_notes(_pixel_failure(ds, exc), notes)) from None
        try:
            return _render(stored, ds, voi)
        except ImageError as exc:
            raise ImageError(_with_notes(str(exc), notes)) from None
        except Exception as exc:  # noqa: BLE001
            raise ImageError(_with_notes(f"cannot render the DICOM image: {_short(exc)}", notes)) from None


def _ensure_transfer_syntax(ds: Any) -> None:
    """A bare data set (no preamble, no file meta) was read uncompressed: say which way."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _check_single_image(ds: Any, max_pixels: int) -> None:
    """Refuse, before decoding pixels, what is not one image of an acceptable size."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise ImageError("a DICOMDIR (the index of a DICOM export), not an image: give pneumoedge the image files")
    if "PixelData" not in ds:
        other = "float pixel data, which is not supported" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no image"
        raise ImageError(f"DICOM object with {other} ({_sop_name(sop_class, ds)})")
    refusal = not_a_radiograph(ds)
    if refusal:
        raise ImageError(refusal)
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported: export the frame to classify as a single image")
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    check_size(columns, rows, max_pixels, "DICOM")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GRAY + _COLOR:
        raise ImageError(f"DICOM photometric interpretation {photometric or '(missing)'!r} is not supported")
    syntax = meta.get("TransferSyntaxUID") if meta else None
    if syntax is not None and getattr(syntax, "is_compressed", False):
        _check_decoder(syntax)


def _check_decoder(syntax: Any) -> None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(f"compressed DICOM in a transfer syntax pydicom cannot decode ({syntax.name})") from None
    if not decoder.is_available:
        raise ImageError(f"compressed DICOM ({syntax.name}) and no decoder for it is installed: {install_hint(syntax)}")


#: pydicom's names for decoder plugins -> what `pip install` takes.
_PIP_NAMES = {"gdcm": "python-gdcm"}


def install_hint(syntax: Any) -> str:
    """What to install for another decoder of `syntax`, from pydicom's own list, as pip commands."""
    from pydicom.pixels import get_decoder

    try:
        missing = get_decoder(syntax).missing_dependencies
    except NotImplementedError:
        return "no decoder for it is known to pydicom"
    commands = []
    for entry in missing:  # "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
        packages = entry.split(" - requires ", 1)[-1].split(" and ")
        names = [_PIP_NAMES.get(p.split(">")[0].split("=")[0].strip(), p.split(">")[0].split("=")[0].strip()) for p in packages]
        commands.append("pip install " + " ".join(names))
    return "; or ".join(commands) if commands else "no other decoder for it is known to pydicom"


def _pixel_failure(ds: Any, exc: Exception) -> str:
    """The reason for a pixel decode that failed: for compressed data, which decoder failed and what else to install."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not getattr(syntax, "is_compressed", False):
        return f"cannot read the DICOM pixel data: {_short(exc)}"
    from pydicom.pixels import get_decoder

    try:
        used = ", ".join(get_decoder(syntax).available_plugins) or "none"
    except NotImplementedError:
        used = "none"
    return (
        f"cannot decode the compressed DICOM pixel data ({syntax.name}) with the installed decoder ({used}): "
        f"{_short(exc)}; another decoder may read it: {install_hint(syntax)}"
    )


def _render(stored: np.ndarray, ds: Any, voi: str) -> np.ndarray:
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _GRAY:
        if stored.ndim != 2:
            raise ImageError(f"DICOM {photometric} pixel data has shape {stored.shape}, expected rows x columns")
        values = _modality(stored, ds)
        unit = _voi(values, ds) if voi == "file" else _min_max(values.astype(np.float64))
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit  # MONOCHROME1 shows low values white: invert to MONOCHROME2
        return (unit * 255.0).astype(np.float32)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        stored = apply_color_lut(stored, ds)
    if stored.ndim != 3 or stored.shape[2] != 3:
        raise ImageError(f"DICOM {photometric} pixel data has shape {stored.shape}, expected rows x columns x 3")
    bits = 8 if stored.dtype == np.uint8 else 16 if photometric == "PALETTE COLOR" else _int(ds, "BitsStored", 8)
    return (stored.astype(np.float32) * np.float32(255.0 / (2**bits - 1))).astype(np.float32)


def _modality(stored: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(stored, ds))


def _voi(values: np.ndarray, ds: Any) -> np.ndarray:
    """The first VOI LUT, else the first window, else min..max; result in 0..1."""
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi_lut

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if len(item.LUTDescriptor) > 2 else 16
        # A LUT is indexed by value: give it integers (rescaled values are whole numbers in practice).
        indices = values if values.dtype.kind in "iu" else np.rint(values).astype(np.int64)
        out = np.asarray(apply_voi_lut(indices, ds, index=0, prefer_lut=True), dtype=np.float64)
        return np.clip(out / (2.0**bits - 1.0), 0.0, 1.0)
    values = values.astype(np.float64)
    window = _first_window(ds)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if function == "LINEAR_EXACT":
            return np.clip((values - center) / width + 0.5, 0.0, 1.0)
        # LINEAR (PS3.3 C.11.2.1.2.1); the clip gives its two flat ends.
        return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)
    return _min_max(values)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _first_window(ds: Any) -> tuple[float, float] | None:
    """The first Window Center/Width pair, or None when absent or unusable (width < 1)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width >= 1.0 and np.isfinite(center) and np.isfinite(width) else None


def _is_multi(value: Any) -> bool:
    return not isinstance(value, (str, bytes, int, float)) and hasattr(value, "__getitem__")


def _int(ds: Any, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        raise ImageError(f"corrupt DICOM: {keyword} is not a number") from None


def _sop_name(uid: str, ds: Any) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    modality = str(ds.get("Modality", "") or "")
    parts = [p for p in (name if name != uid else "", f"modality {modality}" if modality else "", uid) if p]
    return ", ".join(parts) or "unknown object type"


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
