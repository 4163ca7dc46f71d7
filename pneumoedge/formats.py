"""Recognising encoded image bytes before decoding them: which format, what size, whether complete.

A decoder is the wrong place to learn that a file is a PDF, was cut short, or is a
decompression bomb: OpenCV's messages are generic, libjpeg (before OpenCV 5) fills a truncated
JPEG with grey and returns it, and every decoder allocates the declared size before it notices
anything. These checks read headers and chunk/segment lengths only, so they are cheap, and they
run before any pixel is decoded. Every failure is an `ImageError` with a message for the user.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

class ImageError(ValueError):
    """An input that cannot be turned into pixels; the message is meant for the user.

    Defined here, where most of them are raised; `pneumoedge.imageio` and `pneumoedge` export it.
    """


#: What `inspect` recognises as images; everything else is refused with a reason.
READABLE = "pneumoedge reads PNG, JPEG, BMP, TIFF and DICOM"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_BIGTIFF_MAGICS = (b"II+\x00", b"MM\x00+")
# JPEG start-of-frame markers that carry the image size (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Other things that turn up in image folders, by leading bytes -> what to call them.
_NOT_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x7fELF", "a program (ELF executable)"),
    (b"MZ", "a Windows program or library"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office document"),
)
# Image formats that OpenCV might read but pneumoedge does not promise to: refused by name.
_OTHER_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 (codestream)"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
)


@dataclass(frozen=True)
class Header:
    """What the leading bytes say: the format, and for PNG/JPEG/BMP/TIFF the declared size."""

    kind: str  # "png" | "jpeg" | "bmp" | "tiff" | "dicom"
    width: int = 0
    height: int = 0
    #: PNG colour type (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA); -1 otherwise.
    png_color_type: int = -1


def inspect(data: bytes, *, max_pixels: int) -> Header:
    """Recognise `data`, check its declared size against `max_pixels` and that it is complete.

    DICOM is only recognised here; its size and content are checked by `pneumoedge.dicom`.
    Raises `ImageError` naming what is wrong.
    """
    kind = sniff(data)
    if kind == "dicom":
        return Header(kind)
    header = _PARSERS[kind](data)
    check_size(header.width, header.height, max_pixels, kind.upper())
    return header


def sniff(data: bytes) -> str:
    """The image format of `data` by its magic bytes, or `ImageError` saying what it looks like."""
    if data[128:132] == b"DICM":  # first: a preamble may itself hold a TIFF header (dual-format files)
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if data[:4] in _TIFF_MAGICS:
        return "tiff"
    if _looks_like_bare_dicom(data):
        return "dicom"
    if data[:4] in _BIGTIFF_MAGICS:
        raise ImageError("BigTIFF files are not supported: save the image as an ordinary TIFF or PNG")
    other = next((name for magic, name in _OTHER_IMAGES if data.startswith(magic)), None)
    if other is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        other = "WebP"
    if other:
        raise ImageError(f"unsupported image format {other}: {READABLE}; convert it to PNG")
    raise ImageError(f"not an image: {_describe_non_image(data)}; {READABLE}")


def check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse a declared size before anything allocates it (a decompression bomb, or corrupt)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"corrupt {what} header: declared size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"declared size {width}x{height} ({width * height / 1e6:.0f} Mpx) exceeds the limit of "
            f"{max_pixels / 1e6:g} Mpx; a genuine image this large can be allowed with the "
            "environment variable PNEUMOEDGE_MAX_IMAGE_PIXELS"
        )


def bare_dicom_group(head: bytes) -> int:
    """The group (0002, 0004 or 0008) of a bare DICOM data set's first element, or -1 when `head` does not look like one.

    A bare data set has no 128-byte preamble and no "DICM" (old PACS exports).

    Little endian, explicit or implicit VR; or big endian, which is always explicit VR. An
    element number under 0x0100 and a VR of two upper-case letters (or, implicit, a small
    length) rule out most other content.
    """
    if len(head) < 8:
        return -1
    explicit = head[4:6].isalpha() and head[4:6].isupper()
    little_group, little_element = struct.unpack_from("<HH", head)
    if little_group in (0x0002, 0x0004, 0x0008) and little_element < 0x0100:
        if explicit or struct.unpack_from("<I", head, 4)[0] < 1024:
            return little_group
    big_group, big_element = struct.unpack_from(">HH", head)
    if big_group in (0x0002, 0x0004, 0x0008) and big_element < 0x0100 and explicit:
        return big_group
    return -1


def _looks_like_bare_dicom(data: bytes) -> bool:
    return bare_dicom_group(data) != -1


def _describe_non_image(data: bytes) -> str:
    return _looks_like(data) or "unrecognised content (first bytes " + " ".join(f"{b:02x}" for b in data[:8]) + ")"


def _looks_like(data: bytes) -> str:
    for magic, name in _NOT_IMAGES:
        if data.startswith(magic):
            return "looks like " + name
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page (a failed download or a saved web page?)"
    if head.startswith(b"<?xml"):
        return "looks like an XML document"
    if _is_text(data[:1024]):
        return "looks like a text file"
    return ""


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    text = head.decode("utf-8", errors="ignore")
    if len(text) < max(1, len(head) // 2):  # mostly not UTF-8
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t\f" for ch in text)
    return printable >= 0.95 * len(text)


def _truncated(what: str) -> ImageError:
    return ImageError(
        f"truncated {what}: the file ends before the image data does (cut short in a copy, "
        "or still being written); copy it again"
    )


class _Reader:
    """Bounds-checked big/little-endian integers, so a lying header cannot raise struct.error."""

    def __init__(self, data: bytes, what: str, little: bool = False) -> None:
        self.data, self.what, self.prefix = data, what, "<" if little else ">"

    def u16(self, offset: int) -> int:
        return self._get("H", offset, 2)

    def u32(self, offset: int) -> int:
        return self._get("I", offset, 4)

    def i32(self, offset: int) -> int:
        return self._get("i", offset, 4)

    def _get(self, code: str, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.data):
            raise _truncated(self.what)
        return struct.unpack_from(self.prefix + code, self.data, offset)[0]


def _png(data: bytes) -> Header:
    """Walk the chunks: IHDR first, IEND must be reached (libpng's own error is less clear)."""
    read = _Reader(data, "PNG")
    if len(data) < 33:  # signature + IHDR chunk
        raise _truncated("PNG")
    if read.u32(8) != 13 or data[12:16] != b"IHDR":
        raise ImageError("corrupt PNG: the IHDR header chunk is missing")
    width, height, color_type = read.u32(16), read.u32(20), data[25]
    pos = 8
    while True:
        length, kind = read.u32(pos), data[pos + 4 : pos + 8]
        if length > 0x7FFFFFFF:
            raise ImageError(f"corrupt PNG: chunk {kind!r} declares an impossible length")
        if kind == b"IEND":
            return Header("png", width, height, color_type)
        pos += 12 + length
        if pos > len(data):
            raise _truncated("PNG")


def _jpeg(data: bytes) -> Header:
    """Walk the marker segments to the first scan; the end-of-image marker must follow it.

    Entropy-coded data never contains FF D9 (a data FF is stuffed as FF 00), and thumbnails
    inside APPn segments are skipped by the walk, so a missing EOI means a cut file.
    """
    read = _Reader(data, "JPEG")
    pos, size = 2, None
    while True:
        if read.u16(pos) >> 8 != 0xFF:
            raise ImageError("corrupt JPEG: a marker was expected in the header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker == 0xD9:
            raise ImageError("corrupt JPEG: the file ends before any image data")
        length = read.u16(pos + 2)
        if marker in _JPEG_SOF:
            size = (read.u16(pos + 7), read.u16(pos + 5))
        if marker == 0xDA:
            break
        pos += 2 + length
    if size is None:
        raise ImageError("corrupt JPEG: no frame header (SOF) before the image data")
    if data.rfind(b"\xff\xd9", pos + 2 + length) < 0:  # from the end: the EOI is normally last
        raise _truncated("JPEG")
    if size[1] == 0:
        raise ImageError("unsupported JPEG: the height is declared after the image data (DNL marker)")
    return Header("jpeg", *size)


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG's first Exif APP1 segment; 1 when there is none.

    Read as OpenCV reads it (IFD0 tag 0x0112), so the decoder can tell when a file needs the
    rotation OpenCV applies. Damaged Exif counts as no orientation, as in OpenCV.
    """
    pos = 2
    try:
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker, length = data[pos + 1], struct.unpack_from(">H", data, pos + 2)[0]
            if marker == 0xDA:
                return 1
            if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
                tiff = data[pos + 10 : pos + 2 + length]
                read = _Reader(tiff, "Exif", little=tiff[:2] == b"II")
                ifd = read.u32(4)
                for i in range(min(read.u16(ifd), 512)):
                    if read.u16(ifd + 2 + 12 * i) == 0x0112:
                        value = read.u16(ifd + 2 + 12 * i + 8)
                        return value if 1 <= value <= 8 else 1
                return 1
            pos += 2 + length
    except (ImageError, struct.error):
        return 1
    return 1


def _bmp(data: bytes) -> Header:
    read = _Reader(data, "BMP", little=True)
    pixel_offset, dib_size = read.u32(10), read.u32(14)
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, bpp, compression = read.u16(18), read.u16(20), read.u16(24), 0
    else:
        width, height, bpp, compression = read.i32(18), abs(read.i32(22)), read.u16(28), read.u32(30)
    check_size(width, height, 1 << 62, "BMP")  # sign/zero only; the caller checks the limit
    if compression in (0, 3, 6) and bpp in (1, 4, 8, 16, 24, 32):  # uncompressed: size is exact
        if len(data) < pixel_offset + (bpp * width + 31) // 32 * 4 * height:
            raise _truncated("BMP")
    return Header("bmp", width, height)


_TIFF_TYPE_SIZES = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8


def _tiff(data: bytes) -> Header:
    """Read the first IFD: size tags, and that every strip or tile lies inside the file."""
    read = _Reader(data, "TIFF", little=data[:2] == b"II")
    ifd = read.u32(4)
    entries = read.u16(ifd)
    tags: dict[int, list[int]] = {}
    for i in range(min(entries, 4096)):
        at = ifd + 2 + 12 * i
        tag, kind, count = read.u16(at), read.u16(at + 2), read.u32(at + 4)
        if kind in (3, 4) and tag in (256, 257, 273, 279, 324, 325):
            tags[tag] = _tiff_values(read, at + 8, kind, min(count, 1 << 16))
    if not tags.get(256) or not tags.get(257):
        raise ImageError("corrupt TIFF: no image width/height in the first directory")
    for offsets, counts in ((273, 279), (324, 325)):
        ends = [o + c for o, c in zip(tags.get(offsets, []), tags.get(counts, []))]
        if ends and max(ends) > len(data):
            raise _truncated("TIFF")
    return Header("tiff", tags[256][0], tags[257][0])


def _tiff_values(read: _Reader, at: int, kind: int, count: int) -> list[int]:
    size = _TIFF_TYPE_SIZES[kind]
    get: Callable[[int], int] = read.u16 if size == 2 else read.u32
    start = at if size * count <= 4 else read.u32(at)  # small arrays sit in the entry itself
    return [get(start + size * k) for k in range(count)]


_PARSERS: dict[str, Callable[[bytes], Header]] = {"png": _png, "jpeg": _jpeg, "bmp": _bmp, "tiff": _tiff}

