"""Reading image files into pixel arrays: the one decoder that training and the runtime share."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import cv2
import numpy as np

ImageSource = Union[str, Path, bytes, np.ndarray]

#: File name suffixes treated as images when scanning folders.
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"})

_REDUCED_GRAY = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(ValueError):
    """An input that cannot be turned into pixels; the message is meant for the user."""


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def read_bytes(path: Union[str, Path]) -> bytes:
    """Read a file's bytes, turning OS failures into `ImageError`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def decode_bytes(data: bytes, *, reduction: int = 1, gray: bool = False) -> np.ndarray:
    """Decode encoded image bytes to an RGB (H, W, 3) or gray (H, W) uint8/uint16 array.

    Args:
        data: PNG, JPEG, BMP or TIFF bytes.
        reduction: 1, 2, 4 or 8. For JPEG, libjpeg decodes directly at 1/reduction scale
            (much cheaper than a full decode); other formats ignore it. Only for models
            trained through this same function, since it changes pixels.
        gray: with reduction > 1, decode JPEG straight to one luminance channel.
    """
    if reduction not in (1, 2, 4, 8):
        raise ValueError(f"reduction must be 1, 2, 4 or 8, not {reduction}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if reduction > 1 and _is_jpeg(data):
        flags = (_REDUCED_GRAY if gray else _REDUCED_COLOR)[reduction]
    else:
        # ANYDEPTH keeps 16-bit; ANYCOLOR keeps gray files single-channel; EXIF orientation is applied.
        flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    try:
        pixels = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        raise ImageError(f"cannot decode image: {exc.err}") from None
    if pixels is None or pixels.size == 0:
        raise ImageError("not a readable image (unknown format or corrupt data)")
    return _normalise_layout(pixels)


def _normalise_layout(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"unsupported pixel type {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3:
        code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
        pixels = cv2.cvtColor(pixels, code)
    return pixels


def read_pixels(source: ImageSource, *, reduction: int = 1, gray: bool = False) -> np.ndarray:
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
    return decode_bytes(data, reduction=reduction, gray=gray)
