"""The one preprocessing function: decoding, bit depth, colour, resize, scaling, layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumoedge.preprocessing import RESIZE_METHODS, PreprocessSpec, SpecError, preprocess, to_float_pixels, to_tensor
from tests.conftest import gradient_image


def test_8bit_gray_png_scaled_exactly(tmp_path: Path) -> None:
    pixels = gradient_image(32, 32, 0)
    cv2.imwrite(str(tmp_path / "x.png"), pixels)
    spec = PreprocessSpec(height=32, width=32, scale=1 / 255)
    out = preprocess(tmp_path / "x.png", spec)
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :, 0], pixels.astype(np.float32) * np.float32(1 / 255))


def test_16bit_min_max_fills_range_and_full_range_does_not(tmp_path: Path) -> None:
    pixels = gradient_image(40, 40, 1, dtype=np.uint16)  # 12-bit data in a 16-bit container
    cv2.imwrite(str(tmp_path / "x.png"), pixels)
    spec = PreprocessSpec(height=40, width=40, scale=1.0)
    stretched = preprocess(tmp_path / "x.png", spec)
    assert stretched.min() == pytest.approx(0.0) and stretched.max() == pytest.approx(255.0)
    full = preprocess(tmp_path / "x.png", PreprocessSpec(height=40, width=40, scale=1.0, high_bit_depth="full_range"))
    np.testing.assert_allclose(full[:, :, 0], pixels * (255 / 65535), rtol=1e-5)
    assert full.max() < 16.0  # 4095 of 65535


def test_constant_16bit_image_maps_to_zeros() -> None:
    assert not to_float_pixels(np.full((4, 4), 900, np.uint16), "min_max").any()


def test_gray_file_expanded_to_rgb_and_color_file_to_gray(tmp_path: Path) -> None:
    gray = gradient_image(20, 20, 2)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgb = preprocess(tmp_path / "g.png", PreprocessSpec(height=20, width=20, color="rgb", scale=1.0))
    assert rgb.shape == (20, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], gray.astype(np.float32))
    color = gradient_image(20, 20, 3, channels=3)  # treated as RGB
    cv2.imwrite(str(tmp_path / "c.png"), color[:, :, ::-1])  # OpenCV writes BGR
    out = preprocess(tmp_path / "c.png", PreprocessSpec(height=20, width=20, scale=1.0))
    expected = 0.299 * color[:, :, 0] + 0.587 * color[:, :, 1] + 0.114 * color[:, :, 2]
    np.testing.assert_allclose(out[:, :, 0], expected, atol=0.01)


def test_file_bytes_and_array_give_identical_tensors(tmp_path: Path) -> None:
    pixels = gradient_image(70, 50, 4, channels=3)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), pixels[:, :, ::-1])
    spec = PreprocessSpec(height=28, width=28, color="rgb", resize="area", mean=(0.5,), std=(0.25, 0.5, 1.0))
    from_path = preprocess(path, spec)
    np.testing.assert_array_equal(from_path, preprocess(path.read_bytes(), spec))
    np.testing.assert_array_equal(from_path, preprocess(pixels, spec))


@pytest.mark.parametrize("method", sorted(RESIZE_METHODS))
def test_resize_methods_match_opencv_on_float_pixels(method: str) -> None:
    pixels = gradient_image(61, 45, 5)
    spec = PreprocessSpec(height=20, width=30, resize=method, scale=1.0)
    expected = cv2.resize(pixels.astype(np.float32), (30, 20), interpolation=RESIZE_METHODS[method])
    np.testing.assert_array_equal(preprocess(pixels, spec)[:, :, 0], expected)


def test_resize_methods_differ() -> None:
    pixels = gradient_image(61, 45, 5)
    outs = {m: preprocess(pixels, PreprocessSpec(height=20, width=30, resize=m)) for m in ("nearest", "nearest_exact", "area", "bilinear")}
    assert not np.array_equal(outs["nearest"], outs["nearest_exact"])
    assert not np.array_equal(outs["area"], outs["bilinear"])


def test_scale_offset_mean_std_and_nchw() -> None:
    pixels = np.full((4, 4, 3), 100, np.uint8)
    spec = PreprocessSpec(height=4, width=4, color="rgb", scale=0.01, offset=-1.0, mean=(0.0, 1.0, 2.0), std=(1.0, 2.0, 4.0), layout="NCHW")
    out = preprocess(pixels, spec)
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out[:, 0, 0], [0.0, -0.5, -0.5])


def test_reduced_jpeg_decode_is_smaller_and_only_for_jpeg(tmp_path: Path) -> None:
    pixels = gradient_image(400, 320, 6)
    cv2.imwrite(str(tmp_path / "x.jpeg"), pixels)
    cv2.imwrite(str(tmp_path / "x.png"), pixels)
    from pneumoedge.preprocessing import read_for

    spec = PreprocessSpec(height=64, width=64, decode_reduction=4)
    assert read_for(tmp_path / "x.jpeg", spec).shape == (100, 80)
    assert read_for(tmp_path / "x.png", spec).shape == (400, 320)
    full = preprocess(tmp_path / "x.jpeg", PreprocessSpec(height=64, width=64))
    reduced = preprocess(tmp_path / "x.jpeg", spec)
    assert np.abs(full - reduced).max() < 0.1  # close, yet a model must be trained on the same path


def test_spec_round_trips_through_json() -> None:
    spec = PreprocessSpec(height=224, width=200, color="rgb", resize="nearest_exact", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), decode_reduction=2)
    assert PreprocessSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"color": "cmyk"}, "color must be one of"),
        ({"resize": "magic"}, "resize must be one of"),
        ({"height": 0}, "positive integers"),
        ({"std": (0.0,)}, "non-zero"),
        ({"mean": (1.0, 2.0)}, "mean needs 1 or 1 values"),
        ({"decode_reduction": 3}, "decode_reduction"),
    ],
)
def test_invalid_specs_are_refused_clearly(fields: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        PreprocessSpec(**fields)


def test_unknown_spec_field_refused() -> None:
    with pytest.raises(SpecError, match="unknown fields \\['warp'\\]"):
        PreprocessSpec.from_dict({"height": 8, "width": 8, "warp": 9})


@pytest.mark.parametrize("resize", sorted(RESIZE_METHODS))
@pytest.mark.parametrize("size", [(1203, 1442), (640, 480), (97, 213)])
def test_gray_image_for_rgb_model_is_three_equal_resized_channels(resize: str, size: tuple) -> None:
    """Resizing one channel and copying it gives exactly the tensor of resizing three equal channels."""
    gray = np.random.default_rng(sum(size)).integers(0, 256, size=size, dtype=np.uint8)
    spec = PreprocessSpec(height=224, width=200, color="rgb", resize=resize, scale=1 / 127.5, offset=-1.0)
    tensor = to_tensor(gray, spec)
    three = cv2.resize(np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32), (200, 224), interpolation=RESIZE_METHODS[resize])
    expected = three * np.float32(spec.scale) + np.float32(spec.offset)
    assert tensor.shape == (224, 200, 3) and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, expected)
