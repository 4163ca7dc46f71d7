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

import io
from typing import Any

import numpy as np

from pneumoedge.formats import ImageError, check_size

_INSTALL = "reading DICOM needs pydicom: pip install 'pneumoedge[dicom]'"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

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
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        _ensure_transfer_syntax(ds)
        _check_single_image(ds, max_pixels)
        return _render(np.asarray(ds.pixel_array), ds, voi)
    except ImageError:
        raise
    # pydicom parses untrusted bytes and raises many types on a corrupt file (ValueError,
    # KeyError, struct.error, ...): each is a per-file problem to report, never a crash of the run.
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"cannot read the DICOM file: {_short(exc)}") from None


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
        options = "; or ".join(d.split(" - requires ", 1)[-1] for d in decoder.missing_dependencies)
        raise ImageError(
            f"compressed DICOM ({syntax.name}) and no decoder for it is installed: pip install {options}"
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
