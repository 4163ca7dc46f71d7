"""JPEG integrity: damaged entropy-coded data is an error row, pixels stay OpenCV's, no decoder noise."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pneumoedge.imageio import OPENCV_FULL, OPENCV_REDUCED_COLOR, OPENCV_REDUCED_GRAY, ImageError, normalise_layout, decode_bytes
from tests.conftest import gradient_image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **options)
    return out.getvalue()


def _xray_like(height: int = 300, width: int = 260, channels: int = 1) -> np.ndarray:
    smooth = gradient_image(height, width, 11, channels=channels).astype(np.int16)
    noise = np.random.default_rng(3).integers(-20, 20, smooth.shape, dtype=np.int16)  # texture: real entropy data
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _entropy_span(data: bytes) -> tuple[int, int]:
    """Where the first scan's entropy-coded data lies: after the SOS header, before EOI."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return start, data.rindex(b"\xff\xd9")


def damaged(data: bytes, how: str) -> bytes:
    """`data` with its entropy-coded data damaged and every marker left intact."""
    out = bytearray(data)
    start, end = _entropy_span(data)
    middle = (start + end) // 2
    if how == "zeroed":  # a run of lost bytes, as a bad sector or a failed copy leaves them
        out[middle : middle + 64] = bytes(64)
    elif how == "cut_scan":  # the scan cut short, EOI still there: "premature end of data segment"
        del out[middle:end]
    elif how == "scrambled":  # bytes overwritten, never creating a marker
        rng = np.random.default_rng(5)
        for i in range(middle, middle + 200):
            if out[i] != 0xFF and out[i - 1] != 0xFF:
                out[i] = int(rng.integers(0, 0xFF))
    assert bytes(out) != data and out.startswith(b"\xff\xd8") and out.endswith(b"\xff\xd9")
    return bytes(out)


def _opencv(data: bytes, reduction: int, gray: bool) -> np.ndarray:
    """What OpenCV, the decoder the models were trained through, gives for these flags."""
    flags = (OPENCV_REDUCED_GRAY if gray else OPENCV_REDUCED_COLOR)[reduction] if reduction > 1 else OPENCV_FULL
    return normalise_layout(cv2.imdecode(np.frombuffer(data, np.uint8), flags))


def _samples() -> list[tuple[str, bytes]]:
    rgb = _xray_like(channels=3)
    samples = [(p.name, p.read_bytes()) for p in sorted(EXAMPLES.glob("*.jpeg"))[:4]]
    samples += [
        ("gray q90", _jpeg(_xray_like(), quality=90)),
        ("gray progressive", _jpeg(_xray_like(), quality=85, progressive=True)),
        ("rgb 4:2:0", _jpeg(rgb, quality=90, subsampling="4:2:0")),
        ("rgb 4:2:2 progressive", _jpeg(rgb, quality=80, subsampling="4:2:2", progressive=True)),
        ("rgb 4:4:4 odd size", _jpeg(_xray_like(301, 257, 3), quality=95, subsampling="4:4:4")),
    ]
    return samples


@pytest.mark.parametrize("reduction", [1, 2, 4, 8])
def test_pixels_equal_opencv_at_every_scale(reduction: int) -> None:
    """Training decoded through OpenCV: the checked decoder must give the very same pixels."""
    for name, data in _samples():
        for gray in (False, True):
            expected = _opencv(data, reduction, gray)
            got = decode_bytes(data, reduction=reduction, gray=gray)
            assert got.dtype == expected.dtype and got.shape == expected.shape, (name, gray)
            assert np.array_equal(got, expected), (name, reduction, gray)


# Every damage here makes libjpeg warn. A zero run in the gray baseline file is left out: zeros
# there decode as valid Huffman codes to the end of the scan, and no decoder can see it.
@pytest.mark.parametrize(
    "kind, how",
    [(k, h) for k in ("gray", "rgb", "progressive") for h in ("zeroed", "cut_scan", "scrambled") if (k, h) != ("gray", "zeroed")],
)
def test_damaged_entropy_data_is_refused_at_every_scale(kind: str, how: str) -> None:
    pixels = _xray_like(channels=3 if kind == "rgb" else 1)
    data = damaged(_jpeg(pixels, quality=90, progressive=kind == "progressive"), how)
    if kind != "progressive":  # the case of the issue: OpenCV hands back pixels for it
        assert cv2.imdecode(np.frombuffer(data, np.uint8), OPENCV_FULL) is not None
    for reduction in (1, 4):
        with pytest.raises(ImageError, match="corrupt JPEG image data"):
            decode_bytes(data, reduction=reduction, gray=True)


def test_damaged_exif_rotated_and_cmyk_jpegs_are_refused_too() -> None:
    """Files that OpenCV still decodes (EXIF rotation, CMYK) are checked before it runs."""
    image = Image.fromarray(_xray_like())
    exif = image.getexif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    image.save(rotated, "JPEG", exif=exif.tobytes(), quality=90)
    cmyk = io.BytesIO()
    Image.fromarray(_xray_like(channels=3)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    for data in (rotated.getvalue(), cmyk.getvalue()):
        assert decode_bytes(data).ndim in (2, 3)  # intact: decoded
        with pytest.raises(ImageError, match="corrupt JPEG image data"):
            decode_bytes(damaged(data, "cut_scan"))


def test_header_warnings_that_leave_pixels_intact_are_decoded() -> None:
    """libjpeg's "unknown JFIF revision number" says nothing about the pixels: not refused."""
    data = bytearray(_jpeg(_xray_like(), quality=90))
    data[data.index(b"JFIF\x00") + 5] = 2  # JFIF 2.01 does not exist; libjpeg warns and decodes
    np.testing.assert_array_equal(decode_bytes(bytes(data)), _opencv(bytes(data), 1, False))


def test_junk_after_the_scan_is_refused_like_damage() -> None:
    """"extraneous bytes before marker" is also what damaged data decoded out of step gives."""
    data = _jpeg(_xray_like(), quality=90)
    with pytest.raises(ImageError, match="extraneous bytes"):
        decode_bytes(data[:-2] + b"\x00junk\x00" + data[-2:])


def _png_with_bad_crc(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", pixels)
    png = buf.tobytes()
    body = b"Comment\x00x"
    chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + (zlib.crc32(b"tEXt" + body) ^ 1).to_bytes(4, "big")
    return png[:33] + chunk + png[33:]  # after IHDR: libpng warns "tEXt: CRC error", pixels intact


def test_cli_names_the_corruption_and_decoders_stay_silent(bundle_dir: Path, tmp_path: Path) -> None:
    """One run of the real console script: an error row naming the corruption, and stderr free of
    libjpeg/libpng lines, while the image after it is still classified."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_corrupt.jpeg").write_bytes(damaged(_jpeg(_xray_like(), quality=90), "cut_scan"))
    (folder / "b_crc_warning.png").write_bytes(_png_with_bad_crc(_xray_like()))
    (folder / "c_good.jpeg").write_bytes(_jpeg(_xray_like(), quality=90))
    out = tmp_path / "results.csv"
    script = Path(sys.executable).with_name("pneumoedge")
    done = subprocess.run(
        [str(script), "infer", str(folder), "--model", str(bundle_dir), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"},
    )
    assert done.returncode == 1, done.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["a_corrupt.jpeg"]["status"] == "error"
    assert "corrupt JPEG image data" in rows["a_corrupt.jpeg"]["error"]
    assert "premature end of data segment" in rows["a_corrupt.jpeg"]["error"]
    assert rows["b_crc_warning.png"]["status"] == "ok" and rows["c_good.jpeg"]["status"] == "ok"
    assert "Corrupt JPEG" not in done.stderr.replace("corrupt JPEG image data (Corrupt JPEG", "")
    assert "libpng" not in done.stderr and "libjpeg" not in done.stderr
    assert "a_corrupt.jpeg" in done.stderr  # pneumoedge's own summary still reaches the terminal
