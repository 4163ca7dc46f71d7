"""The images a measurement runs on: a user's folder, or X-ray-sized phantoms written for it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from pneumoedge.benchmarking.measure import BenchError
from pneumoedge.imageio import IMAGE_SUFFIXES
from pneumoedge.runtime.folder import discover


def find_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted), found as `infer` finds them."""
    if not folder.is_dir():
        raise BenchError(f"--images {folder}: no such folder")
    found = [path for path, kind, _ in discover([folder]) if kind == "image"]
    if not found:
        raise BenchError(f"--images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def write_phantoms(folder: Path, n: int = 6, size: tuple[int, int] = (1400, 1200), seed: int = 7) -> list[Path]:
    """Write `n` synthetic chest X-ray phantoms at real X-ray size (JPEG, the last a 16-bit PNG).

    Synthetic, not patients: decode cost at realistic size is what matters for latency.
    """
    from pneumoedge.datasets.phantoms import KINDS, render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sixteen = n > 1 and i == n - 1
        pixels = render_phantom(rng, KINDS[i % len(KINDS)], size[0], size[1], sixteen_bit=sixteen)
        path = folder / (f"phantom_{i:02d}" + (".png" if sixteen else ".jpeg"))
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if sixteen else [cv2.IMWRITE_JPEG_QUALITY, 90]
        ok, data = cv2.imencode(path.suffix, pixels, params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {path}")
        path.write_bytes(data.tobytes())
        paths.append(path)
    return paths


def bench_images(folder: Optional[Path]) -> tuple[list[Path], str, Optional[tempfile.TemporaryDirectory]]:
    """The images to use: those under `folder`, or freshly written phantoms in a temporary folder.

    Returns (paths, description, the temporary folder to clean up or None).
    """
    if folder is not None:
        return find_images(folder), str(folder), None
    scratch = tempfile.TemporaryDirectory(prefix="pneumoedge-bench-")
    paths = write_phantoms(Path(scratch.name))
    return paths, f"{len(paths)} generated phantoms 1400x1200 (5 JPEG, 1 16-bit PNG)", scratch
