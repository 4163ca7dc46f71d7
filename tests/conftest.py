"""Shared fixtures: small generated images and tiny ONNX models/bundles (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumoedge.bundle import MemberSource, write_bundle
from pneumoedge.preprocessing import PreprocessSpec
from tests.onnx_models import mean_model

SPEC_GRAY = PreprocessSpec(height=32, width=32, color="gray", resize="area")
SPEC_RGB = PreprocessSpec(height=24, width=40, color="rgb", resize="bilinear")


def gradient_image(height: int, width: int, seed: int, *, channels: int = 1, dtype=np.uint8) -> np.ndarray:
    """A smooth random image (so resizing methods give different but stable results)."""
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 4095
    small = rng.uniform(0, top, size=(6, 6, channels)).astype(np.float32)
    big = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big, 0, top).astype(dtype)
    return big if channels > 1 else big.reshape(height, width)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six readable images of mixed kinds, in two levels of folders."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    cv2.imwrite(str(root / "a.jpeg"), gradient_image(80, 64, 1))
    cv2.imwrite(str(root / "b.png"), gradient_image(50, 70, 2))
    cv2.imwrite(str(root / "c.png"), gradient_image(64, 64, 3, dtype=np.uint16))
    cv2.imwrite(str(root / "sub" / "d.jpg"), gradient_image(90, 90, 4, channels=3))
    cv2.imwrite(str(root / "sub" / "e.bmp"), gradient_image(40, 40, 5))
    cv2.imwrite(str(root / "sub" / "f.PNG"), gradient_image(33, 47, 6, channels=3))
    return root


@pytest.fixture
def gray_model(tmp_path: Path) -> Path:
    return mean_model(tmp_path / "gray.onnx", SPEC_GRAY, a=(4.0,), b=(-2.0,))


@pytest.fixture
def rgb_model(tmp_path: Path) -> Path:
    return mean_model(tmp_path / "rgb.onnx", SPEC_RGB, a=(-3.0,), b=(1.0,))


@pytest.fixture
def bundle_dir(tmp_path: Path, gray_model: Path, rgb_model: Path) -> Path:
    """A two-member binary bundle (gray 32x32 weight 1, rgb 24x40 weight 3), threshold 0.4."""
    write_bundle(
        tmp_path / "bundle",
        [
            MemberSource(gray_model, "gray", SPEC_GRAY, weight=1.0),
            MemberSource(rgb_model, "rgb", SPEC_RGB, weight=3.0),
        ],
        labels=("NORMAL", "PNEUMONIA"),
        threshold=0.4,
        threshold_method="test",
        provenance={"synthetic": True},
        name="test-bundle",
    )
    return tmp_path / "bundle"
