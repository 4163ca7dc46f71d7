"""Drawing primitives shared by the synthetic images (chest phantoms, body parts, foreign kinds)."""

from __future__ import annotations

from typing import Union

import cv2
import numpy as np

#: Images are drawn at about this many pixels on their longer side, then resized to the output.
WORK_SIDE = 384
#: The grey of the film outside the body (0..1).
BACKGROUND = 0.04
#: An output size: one side, (height, width), or ((hmin, hmax), (wmin, wmax)) drawn per image.
Size = Union[int, tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]


def work_shape(height: int, width: int) -> tuple[int, int]:
    """The drawing size for an output size: WORK_SIDE on the longer side, at least 32 pixels."""
    scale = WORK_SIDE / max(height, width)
    return max(32, round(height * scale)), max(32, round(width * scale))


def blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), max(sigma_px, 0.3))


def pt(x: float, y: float, h: int, w: int) -> tuple[int, int]:
    """A point given as fractions of the width and height, in pixels."""
    return int(round(x * w)), int(round(y * h))


def band_noise(rng: np.random.Generator, h: int, w: int, fine: float, coarse: float) -> np.ndarray:
    """Band-passed noise scaled to -1..1: a texture between `fine` and `coarse` pixels."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    band = blur(noise, fine) - blur(noise, coarse)
    return band / (float(np.abs(band).max()) + 1e-6)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def pick_size(size: Size, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of one image: fixed, or drawn from the ranges."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    if isinstance(h, (tuple, list)) and isinstance(w, (tuple, list)):
        return int(rng.integers(h[0], h[1] + 1)), int(rng.integers(w[0], w[1] + 1))
    if isinstance(h, (tuple, list)) or isinstance(w, (tuple, list)):
        raise ValueError(f"size must be (height, width) or ((hmin, hmax), (wmin, wmax)), got {size!r}")
    return int(h), int(w)
