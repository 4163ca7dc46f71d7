"""Reading image files into pixel arrays: the one decoder that training and the runtime share.

Every input is recognised by its content (`pneumoedge.formats`) before it is decoded: its
format, declared size (decompression bombs are refused before anything is allocated) and
completeness (a truncated file is refused, never decoded into grey). DICOM goes to
`pneumoedge.dicom`, JPEG to libjpeg-turbo through simplejpeg (which refuses corrupt entropy-coded
data that OpenCV would decode with only a warning, with OpenCV's pixels), the rest to OpenCV.
EXIF orientation is applied, as a viewer shows the image, in every decode path (full and
reduced JPEG decodes alike). docs/inputs.md has the
policies and every reason a file can be refused.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

import cv2
import numpy as np

from pneumoedge.formats import ImageError, inspect, jpeg_orientation

__all__ = [
    "IMAGE_SUFFIXES", "DICOM_SUFFIXES", "ImageError", "ImageSource", "read_bytes", "decode_bytes", "read_pixels",
    "max_image_pixels", "decoder_messages_to_log",
]

ImageSource = Union[str, Path, bytes, np.ndarray]

#: DICOM file name suffixes; DICOM files without a suffix are found by content (see folder discovery).
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
#: File name suffixes treated as images when scanning folders.
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}) | DICOM_SUFFIXES

#: Largest image accepted, in pixels (width x height), unless PNEUMOEDGE_MAX_IMAGE_PIXELS says
#: otherwise: far above any radiograph (a 43 cm detector at 0.1 mm is ~18 Mpx), far below
#: what would exhaust a workstation's memory with a few decode threads.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
#: Bytes per pixel allowed in a file before it is refused unread (uncompressed 16-bit RGB is 6).
_MAX_BYTES_PER_PIXEL = 8

#: OpenCV's decode flags for what simplejpeg cannot decode (and for tests/test_jpeg_integrity.py's comparison).
OPENCV_REDUCED_GRAY = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
OPENCV_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# ANYDEPTH keeps 16-bit; ANYCOLOR keeps gray files single-channel (alpha is dropped by OpenCV).
OPENCV_FULL = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
# Gray+alpha PNGs: ANYCOLOR would give 3 equal channels; this gives the gray channel itself.
_GRAY_KEEP_DEPTH = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH


def max_image_pixels() -> int:
    """The size limit in pixels: PNEUMOEDGE_MAX_IMAGE_PIXELS, or `DEFAULT_MAX_IMAGE_PIXELS`."""
    text = os.environ.get("PNEUMOEDGE_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(f"PNEUMOEDGE_MAX_IMAGE_PIXELS must be a positive number of pixels, got {text!r}")
    return value


def read_bytes(path: Union[str, Path]) -> bytes:
    """Read a file's bytes, turning OS failures into `ImageError` with what to do about them."""
    limit = max_image_pixels() * _MAX_BYTES_PER_PIXEL
    try:
        # Non-blocking open, then a type check: a named pipe must not hang the run.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ImageError("is a directory, not an image file")
            if not stat.S_ISREG(info.st_mode):
                raise ImageError("not a regular file (a pipe, socket or device), not read")
            size = info.st_size
            if size > limit:
                raise ImageError(
                    f"file is {_bytes(size)}, more than any image within the size limit "
                    f"({_bytes(limit)}; see PNEUMOEDGE_MAX_IMAGE_PIXELS)"
                )
            data = handle.read(limit + 1)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError("broken link: the file it points to does not exist") from None
        raise ImageError("file not found: moved or deleted after it was listed?") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageError("permission denied: the account running pneumoedge cannot read this file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("link loop: the link points, through links, back to itself") from None
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file (0 bytes): still being written, or a failed copy?")
    return data


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def decode_bytes(data: bytes, *, reduction: int = 1, gray: bool = False, dicom_voi: str = "file") -> np.ndarray:
    """Decode encoded image bytes to pixels.

    Returns (H, W) gray or (H, W, 3) RGB: uint8 or uint16 for PNG/JPEG/BMP/TIFF, float32 in
    0..255 for DICOM (already rendered through its VOI; see `pneumoedge.dicom`).

    Args:
        data: PNG, JPEG, BMP, TIFF or DICOM bytes (recognised by content, not by name).
        reduction: 1, 2, 4 or 8. For JPEG, libjpeg decodes directly at 1/reduction scale
            (much cheaper than a full decode); other formats ignore it. Only for models
            trained through this same function, since it changes pixels.
        gray: with reduction > 1, decode JPEG straight to one luminance channel.
        dicom_voi: "file" or "min_max": which VOI renders a DICOM image (`pneumoedge.dicom`).
    """
    if reduction not in (1, 2, 4, 8):
        raise ValueError(f"reduction must be 1, 2, 4 or 8, not {reduction}")
    limit = max_image_pixels()
    header = inspect(data, max_pixels=limit)
    if header.kind == "dicom":
        from pneumoedge.dicom import decode_dicom

        return decode_dicom(data, max_pixels=limit, voi=dicom_voi)
    if header.kind == "jpeg":
        pixels = _decode_jpeg_checked(data, reduction, gray)
        if pixels is not None:
            return pixels
    if reduction > 1 and header.kind == "jpeg":
        flags = (OPENCV_REDUCED_GRAY if gray else OPENCV_REDUCED_COLOR)[reduction]
    elif header.png_color_type == 4:
        flags = _GRAY_KEEP_DEPTH
    else:
        flags = OPENCV_FULL
    try:
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ImageError(f"cannot decode {header.kind.upper()} image: {exc.err}") from None
    if pixels is None or pixels.size == 0:
        raise ImageError(f"corrupt {header.kind.upper()} image: the decoder could not read its data")
    return normalise_layout(pixels)


#: libjpeg warnings about headers that leave every pixel intact: decoded as before. Every other
#: warning ("Corrupt JPEG data: ...", "Premature end of JPEG file") means entropy-coded data
#: that libjpeg filled in or decoded out of step; those files are refused. "N extraneous bytes
#: before marker" is among them: junk appended after a scan and a scan decoded out of step
#: (damaged bytes) give the same message, and only the second was seen in tests.
_HARMLESS_JPEG_WARNINGS = (
    "unknown jfif revision",
    "invalid sos parameters for sequential jpeg",
    "unsupported marker type",
)


def _decode_jpeg_checked(data: bytes, reduction: int, gray: bool) -> Optional[np.ndarray]:
    """Decode a JPEG with libjpeg-turbo (simplejpeg), refusing data that libjpeg warns is corrupt.

    OpenCV decodes damaged entropy-coded data with only a warning on stderr and returns
    smeared pixels; simplejpeg raises on that warning. Its pixels are those of OpenCV's
    flags here (same libjpeg-turbo algorithms: islow IDCT, fancy upsampling, DCT scaling),
    which tests/test_jpeg_integrity.py proves. Files that need what only OpenCV does (EXIF
    rotation, CMYK) are checked the same way at 1/8 scale and return None: OpenCV decodes them.
    """
    import simplejpeg  # a small wheel bundling libjpeg-turbo; imported here, not at import time

    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # not a JPEG libjpeg-turbo's header reader takes (12-bit, odd markers): OpenCV's
    needs_opencv = space in ("CMYK", "YCCK") or jpeg_orientation(data) != 1
    if needs_opencv:
        colorspace, factor = ("CMYK" if space in ("CMYK", "YCCK") else "GRAY"), 8
    else:
        colorspace = "GRAY" if (gray and reduction > 1) or (reduction == 1 and space == "Gray") else "RGB"
        factor = reduction
    # libjpeg's 1/r scaled size is ceil(size / r); asking for at least that picks exactly 1/r.
    size = {"min_height": -(-height // factor), "min_width": -(-width // factor)} if factor > 1 else {}
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, **size)
    except ValueError as strict_error:
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=False, **size)
        except ValueError:
            return None  # an error, not a warning: OpenCV's decode gives the verdict and message
        message = str(strict_error).strip()
        if not any(harmless in message.lower() for harmless in _HARMLESS_JPEG_WARNINGS):
            raise ImageError(
                f"corrupt JPEG image data ({message}): part of the image would be filled in by the "
                "decoder; export or copy the image again"
            ) from None
    if needs_opencv:
        return None
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


def normalise_layout(pixels: np.ndarray) -> np.ndarray:
    """OpenCV's decoded pixels as pneumoedge keeps them: (H, W) gray or (H, W, 3) RGB, 8 or 16 bits."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"unsupported pixel type {pixels.dtype}: only 8- and 16-bit images are read")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3:
        code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
        pixels = cv2.cvtColor(pixels, code)
    return pixels


def read_pixels(source: ImageSource, *, reduction: int = 1, gray: bool = False, dicom_voi: str = "file") -> np.ndarray:
    """Decode a path, encoded bytes, or an array into pixels (see `decode_bytes`).

    Arrays are taken as already decoded: (H, W) gray or (H, W, 3) RGB, uint8 or uint16.
    """
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3)):
            raise ImageError(f"array must be (H, W) or (H, W, 3), got shape {source.shape}")
        if source.ndim == 3 and source.shape[2] == 1:
            source = source[:, :, 0]
        if source.dtype not in (np.uint8, np.uint16):
            raise ImageError(f"array must be uint8 or uint16, got {source.dtype}")
        return source
    data = source if isinstance(source, bytes) else read_bytes(source)
    return decode_bytes(data, reduction=reduction, gray=gray, dicom_voi=dicom_voi)


@contextlib.contextmanager
def decoder_messages_to_log() -> Iterator[None]:
    """Keep what C libraries print on file descriptor 2 (libpng, libjpeg inside OpenCV) off the terminal.

    Their lines ("libpng warning: tEXt: CRC error") would land between pneumoedge's own output;
    the verdict on each file is already in its result row. For a command's whole run, fd 2 goes
    to a pipe whose lines are shown only with --verbose (prefixed "decoder:"), while Python's
    `sys.stderr` (progress, summary, logging) keeps the terminal. Process-wide, so it is
    thread-safe for the decode pool by construction; a no-op when stderr is not fd 2 (tests).
    """
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            raise OSError
    except (OSError, ValueError, AttributeError):
        yield
        return
    old_stream = sys.stderr
    old_stream.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    new_stream = io.TextIOWrapper(
        io.FileIO(os.dup(terminal), "w"), encoding=old_stream.encoding, errors="backslashreplace", line_buffering=True
    )
    handlers = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler) and h.stream is old_stream]
    verbose = logging.getLogger("pneumoedge").isEnabledFor(logging.INFO)

    def relay() -> None:
        with io.FileIO(read_end, "r") as pipe:
            for line in io.BufferedReader(pipe):
                if verbose:
                    os.write(terminal, b"decoder: " + line)

    reader = threading.Thread(target=relay, name="pneumoedge-decoder-messages", daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = new_stream
    for handler in handlers:
        handler.setStream(new_stream)
    try:
        yield
    finally:
        new_stream.flush()
        os.dup2(terminal, 2)  # closes the pipe's last write end: the relay ends
        reader.join(timeout=2)
        sys.stderr = old_stream
        for handler in handlers:
            handler.setStream(old_stream)
        new_stream.close()
        os.close(terminal)
