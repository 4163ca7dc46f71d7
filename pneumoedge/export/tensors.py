"""Images for the export side's checks: listing a folder, preprocessing files, generated phantoms."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from pneumoedge.export.errors import ExportError
from pneumoedge.imageio import IMAGE_SUFFIXES, ImageError
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from pneumoedge.runtime.folder import discover


def image_files(folder: Union[str, Path], limit: Optional[int] = None) -> list[Path]:
    """Image files under `folder` (recursive, sorted, found as `infer` finds them); `limit` picks evenly."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"{root}: not a folder of images")
    files = sorted(path for path, kind, _ in discover([root]) if kind == "image")
    if not files:
        raise ExportError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return evenly(files, limit)


def evenly(files: Sequence[Path], limit: Optional[int]) -> list[Path]:
    """At most `limit` of `files`, picked evenly across the list (all when `limit` is None)."""
    if limit is None or len(files) <= limit:
        return list(files)
    picks = np.linspace(0, len(files) - 1, limit).round().astype(int)
    return [files[i] for i in sorted(set(picks.tolist()))]


def load_tensors(files: Iterable[Union[str, Path]], spec: PreprocessSpec) -> np.ndarray:
    """Stack `preprocess(file, spec)` for each file: (N, *spec.input_shape) float32."""
    tensors = []
    for path in files:
        try:
            tensors.append(preprocess(path, spec))
        except ImageError as exc:
            raise ExportError(f"{path}: {exc}") from None
    if not tensors:
        raise ExportError("no images to preprocess")
    return np.stack(tensors).astype(np.float32, copy=False)


def phantom_folder(root: Union[str, Path], *, count: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Generate a small set of labelled synthetic phantoms (Kaggle layout) under `root`."""
    from pneumoedge.datasets import phantoms

    normal = max(1, count // 2)
    bacteria = max(1, (count - normal) // 2)
    phantoms.generate_dataset(
        root,
        counts={"train": {"normal": normal, "bacteria": bacteria, "virus": max(1, count - normal - bacteria)}},
        size=size,
        seed=seed,
        sixteen_bit_fraction=0.2,
    )
    return Path(root)


def reference_tensors(
    spec: PreprocessSpec, images: Optional[Union[str, Path]] = None, *, count: int = 32, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Real preprocessed images for parity: from `images` (a folder) or generated phantoms."""
    if images is not None:
        files = image_files(images, limit=count)
        return load_tensors(files, spec), f"{len(files)} images from {images}"
    with tempfile.TemporaryDirectory(prefix="pneumoedge-parity-") as tmp:
        folder = phantom_folder(tmp, count=count, size=max(spec.height, spec.width, 64), seed=seed)
        files = image_files(folder, limit=count)
        return load_tensors(files, spec), f"{len(files)} generated phantom images (no folder given)"
