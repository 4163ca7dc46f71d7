"""Images as hospitals have them: recognised by content, odd layouts, bombs, and a hostile folder."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pneumoedge.cli import app
from pneumoedge.imageio import ImageError, read_pixels
from pneumoedge.preprocessing import PreprocessSpec, preprocess, read_for
from pneumoedge.runtime import folder as folder_module
from tests.conftest import gradient_image
from tests.input_files import encoded, jpeg_bomb, png_bomb

runner = CliRunner()
RGB = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _pil(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _refused(data: bytes) -> str:
    with pytest.raises(ImageError) as caught:
        read_pixels(data)
    return str(caught.value)


# -- recognised by content -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "not an image: looks like a PDF document"),
        ("Patient list\nJohn Doe, 1970\n".encode(), "not an image: looks like a text file"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "not an image: looks like an HTML page"),
        (b"PK\x03\x04\x14\x00\x06\x00", "not an image: looks like a ZIP archive"),
        (bytes(range(7, 200)), "not an image: unrecognised content (first bytes 07 08 09"),
    ],
)
def test_non_images_are_named_not_decoded(data: bytes, reason: str) -> None:
    message = _refused(data)
    assert message.startswith(reason) and "pneumoedge reads PNG, JPEG, BMP, TIFF and DICOM" in message


def test_other_image_formats_are_refused_by_name() -> None:
    assert _refused(b"GIF89a\x01\x00\x01\x00").startswith("unsupported image format GIF: pneumoedge reads PNG")
    assert _refused(b"RIFF\x10\x00\x00\x00WEBPVP8 ").startswith("unsupported image format WebP")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_wrong_suffix_does_not_matter(tmp_path: Path, ext: str) -> None:
    pixels = gradient_image(30, 20, 3)
    path = tmp_path / "image.jpeg"  # every one of them named .jpeg
    path.write_bytes(encoded(ext, pixels))
    decoded = read_pixels(path)
    assert decoded.shape == (30, 20)
    if ext != ".jpg":
        np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("ext, what", [(".png", "PNG"), (".jpg", "JPEG"), (".bmp", "BMP"), (".tif", "TIFF")])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files_are_refused_not_decoded_to_grey(ext: str, what: str, keep: float) -> None:
    data = encoded(ext, gradient_image(200, 160, 4), [cv2.IMWRITE_TIFF_COMPRESSION, 1] if ext == ".tif" else [])
    assert _refused(data[: int(len(data) * keep)]).startswith(f"truncated {what}: the file ends before the image data")


def test_truncated_progressive_jpeg_is_refused() -> None:
    data = _pil(Image.fromarray(RGB), "JPEG", progressive=True)
    assert _refused(data[:-40]).startswith("truncated JPEG")


# -- decompression bombs ---------------------------------------------------------------------


@pytest.mark.parametrize("bomb", [png_bomb, jpeg_bomb])
def test_bombs_are_refused_from_the_header_before_allocating(bomb) -> None:
    data = bomb(40000, 40000)
    assert len(data) < 2000
    resource = pytest.importorskip("resource")  # POSIX only
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    message = _refused(data)  # "declared size" says it was refused before any decoder ran
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    assert message.startswith("declared size 40000x40000 (1600 Mpx) exceeds the limit of 100 Mpx")
    assert "PNEUMOEDGE_MAX_IMAGE_PIXELS" in message


def test_bmp_and_tiff_declared_sizes_are_checked_too(monkeypatch) -> None:
    monkeypatch.setenv("PNEUMOEDGE_MAX_IMAGE_PIXELS", "1000")
    for ext in (".bmp", ".tif", ".png", ".jpg"):
        assert _refused(encoded(ext)).startswith("declared size 40x48 (0 Mpx) exceeds the limit of 0.001 Mpx")
    monkeypatch.setenv("PNEUMOEDGE_MAX_IMAGE_PIXELS", "1920")
    assert read_pixels(encoded(".png")).shape == (48, 40)  # exactly at the limit
    monkeypatch.setenv("PNEUMOEDGE_MAX_IMAGE_PIXELS", "lots")
    assert "PNEUMOEDGE_MAX_IMAGE_PIXELS must be a positive number" in _refused(encoded(".png"))


def test_file_larger_than_the_limit_allows_is_refused_unread(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encoded(".png", gradient_image(100, 100, 3)))
    monkeypatch.setenv("PNEUMOEDGE_MAX_IMAGE_PIXELS", "100")  # 800 bytes allowed
    with pytest.raises(ImageError, match=r"^file is \d+\.\d kB, more than any image within the size limit \(800 bytes"):
        read_pixels(path)


def test_io_error_on_a_dropped_share_is_a_clean_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "far away.png"
    path.write_bytes(encoded(".png"))
    real_open = os.open

    def dropped(target, *args, **kwargs):
        if Path(target) == path:
            raise OSError(5, "Input/output error", str(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", dropped)
    with pytest.raises(ImageError, match="^cannot read file: Input/output error$"):
        read_pixels(path)


# -- odd PNG and JPEG layouts ----------------------------------------------------------------


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    return _pil(image, "JPEG", exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_exif_orientation_is_applied_at_every_decode_scale(color: str) -> None:
    base = gradient_image(64, 128, 5)
    base[:, :16] = 255  # a bright band on the left, to see where it went
    pixels = base if color == "gray" else np.repeat(base[:, :, None], 3, axis=2)
    data = exif_jpeg(pixels, 6)  # 6: displayed rotated 90 degrees clockwise
    plain = read_pixels(exif_jpeg(pixels, 1))
    for reduction in (1, 2, 4):
        spec = PreprocessSpec(color=color, decode_reduction=reduction)
        shown = read_for(data, spec)
        assert shown.shape[:2] == (128 // reduction, 64 // reduction)
        rows = shown if shown.ndim == 2 else shown[:, :, 0]
        assert rows[: 16 // reduction].mean() > 240  # the left band is now on top
    np.testing.assert_allclose(read_pixels(data), np.rot90(plain, k=-1), atol=12)


def test_alpha_is_dropped_keeping_the_stored_colours() -> None:
    rgba = np.dstack([RGB, np.zeros(RGB.shape[:2], np.uint8)])  # fully transparent
    np.testing.assert_array_equal(read_pixels(_pil(Image.fromarray(rgba, "RGBA"), "PNG")), RGB)


def test_gray_alpha_png_stays_gray() -> None:
    gray = gradient_image(20, 30, 6)
    la = Image.fromarray(np.dstack([gray, np.full_like(gray, 128)]), "LA")
    decoded = read_pixels(_pil(la, "PNG"))
    assert decoded.shape == (20, 30)
    np.testing.assert_array_equal(decoded, gray)


def test_palette_png_is_expanded_to_rgb() -> None:
    palette = Image.fromarray(RGB).quantize(colors=16)
    np.testing.assert_array_equal(read_pixels(_pil(palette, "PNG")), np.asarray(palette.convert("RGB")))


def test_16bit_gray_png_keeps_every_value() -> None:
    deep = (np.arange(40 * 50, dtype=np.uint16) * 31).reshape(40, 50)
    decoded = read_pixels(_pil(Image.fromarray(deep), "PNG"))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, deep)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    data = _pil(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=100)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    decoded = read_pixels(data)
    assert decoded.shape == (24, 32, 3)
    assert np.abs(decoded.astype(np.int16) - reference).max() <= 2


def test_progressive_jpeg_decodes_like_baseline() -> None:
    gray = gradient_image(64, 48, 8)
    progressive = read_pixels(_pil(Image.fromarray(gray), "JPEG", progressive=True, quality=95))
    baseline = read_pixels(_pil(Image.fromarray(gray), "JPEG", quality=95))
    assert progressive.shape == (64, 48)
    assert np.abs(progressive.astype(int) - baseline.astype(int)).max() <= 2


def test_12bit_png_full_range_is_dark_min_max_is_not() -> None:
    # 12-bit data stored unscaled in 16 bits: what each high_bit_depth policy makes of it.
    data = encoded(".png", gradient_image(32, 32, 9, dtype=np.uint16))
    full = preprocess(data, PreprocessSpec(height=32, width=32, scale=1.0, high_bit_depth="full_range"))
    stretched = preprocess(data, PreprocessSpec(height=32, width=32, scale=1.0))
    assert full.max() <= 4095 * 255 / 65535 + 1e-3 and stretched.max() == pytest.approx(255.0)


# -- a hostile folder through the real CLI ----------------------------------------------------


def _hostile_folder(root: Path) -> dict[str, tuple[str, str]]:
    """Write the corpus; return {relative name: (expected status, expected reason substring)}."""
    from tests.input_files import dicom_bytes

    root.mkdir()
    jpeg = encoded(".jpg", gradient_image(120, 100, 1))
    png = encoded(".png", gradient_image(120, 100, 2))
    twelve = (np.arange(64 * 64) % 4096).astype(np.uint16).reshape(64, 64)
    files: dict[str, tuple[bytes, str, str]] = {
        "good.jpeg": (jpeg, "ok", ""),
        "png named.jpeg": (png, "ok", ""),
        "ünïcode 胸部 x-ray.png": (png, "ok", ""),
        "zero.png": (b"", "error", "empty file (0 bytes)"),
        "cut.jpeg": (jpeg[: len(jpeg) // 2], "error", "truncated JPEG"),
        "cut.png": (png[:-30], "error", "truncated PNG"),
        "letter.png": (b"Dear colleague,\nplease find attached\n", "error", "looks like a text file"),
        "report.jpeg": (b"%PDF-1.4\n", "error", "looks like a PDF document"),
        "bomb.png": (png_bomb(), "error", "declared size 40000x40000"),
        "vanishing.png": (png, "error", "file not found"),
        "locked.png": (png, "error", "permission denied"),
        "scan.dcm": (dicom_bytes(twelve, bits_stored=12, photometric="MONOCHROME1"), "ok", ""),
        "IM0001": (dicom_bytes(twelve, bits_stored=12), "ok", ""),
        "cine.dcm": (dicom_bytes(twelve, pixel_data=twelve.tobytes() * 2, NumberOfFrames=2), "error", "multi-frame"),
        "sr.dcm": (dicom_bytes(None, sop_class="1.2.840.10008.5.1.4.1.1.88.11"), "error", "no image"),
        "DICOMDIR": (dicom_bytes(None, sop_class="1.2.840.10008.1.3.10"), "skipped", "DICOMDIR"),
        "summary.pdf": (b"%PDF-1.4\n", "skipped", "not an image file (.pdf)"),
        "Thumbs.db": (b"\xd0\xcf\x11\xe0" + b"\x00" * 60, "skipped", "not an image file (.db)"),
    }
    for name, (data, _, _) in files.items():
        (root / name).write_bytes(data)
    (root / "locked.png").chmod(0)
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "cycle").symlink_to(root, target_is_directory=True)
    expected = {name: (status, reason) for name, (_, status, reason) in files.items()}
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "stream.png")  # opening a pipe to read would wait for a writer forever
        expected["stream.png"] = ("error", "not a regular file")
    expected.update(
        {
            "loop.png": ("error", "link loop"),
            "dangling.jpg": ("error", "broken link"),
            "cycle": ("skipped", "link to a folder, not followed"),
        }
    )
    return expected


def test_hostile_folder_every_file_one_row_with_its_reason(bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("pydicom")
    root = tmp_path / "hostile in"
    expected = _hostile_folder(root)
    real_discover = folder_module.discover

    def discover_then_lose_a_file(*args, **kwargs):
        # A file listed, then deleted (or moved by a PACS job) before it is read.
        for path, kind, reason in real_discover(*args, **kwargs):
            if path.name == "vanishing.png":
                path.unlink()
            yield path, kind, reason

    monkeypatch.setattr(folder_module, "discover", discover_then_lose_a_file)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root reads a mode-000 file anyway: make the OS refuse it as it would anyone else.
        real_open = os.open

        def open_as_user(path, *args, **kwargs):
            if Path(path).name == "locked.png":
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_as_user)
    out = tmp_path / "results.csv"
    result = runner.invoke(app, ["infer", str(root), "--model", str(bundle_dir), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = [str(Path(r["path"]).relative_to(root)) for r in rows]
    assert sorted(names) == sorted(expected), "exactly one row per file"
    for row, name in zip(rows, names):
        status, reason = expected[name]
        assert (row["status"], name) == (status, name), row
        assert reason in row["error"], (name, row["error"])
        if status == "ok":
            assert row["label"] in ("NORMAL", "PNEUMONIA") and not row["error"]
