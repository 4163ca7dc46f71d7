"""Builders of awkward input files for the input tests: DICOM written with pydicom, crafted headers."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, Optional

import cv2
import numpy as np

from tests.conftest import gradient_image


def dicom_bytes(
    pixels: Optional[np.ndarray],
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: Optional[int] = None,
    syntax: Optional[str] = None,
    pixel_data: Optional[bytes] = None,
    preamble: bool = True,
    sop_class: Optional[str] = None,
    **attributes: Any,
) -> bytes:
    """A DICOM file holding `pixels` (None: an object without pixel data), as bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class or SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 1 if pixels.ndim == 2 else 3
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    if preamble:
        ds.save_as(out, enforce_file_format=True)
    else:  # a bare data set: no preamble, no "DICM", no file meta (old PACS exports)
        del ds.file_meta
        ds.save_as(out, implicit_vr=True, little_endian=True)
    return out.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A real small JPEG with the size in its frame header (SOF0) rewritten."""
    data = bytearray(cv2.imencode(".jpg", gradient_image(16, 16, 0))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encoded(ext: str, pixels: Optional[np.ndarray] = None, params: Optional[list] = None) -> bytes:
    """`pixels` (default: a 48x40 gray gradient) encoded by OpenCV as `ext`."""
    image = gradient_image(48, 40, 7) if pixels is None else pixels
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()
