"""Synthetic images a chest X-ray classifier should NOT be trusted on (tests of the out-of-distribution flag).

Nine kinds, all drawn from shapes and seeded random numbers (numpy + OpenCV; nothing
downloaded, no real person): natural-looking scenes (RGB), scanned documents, flat grey,
noise, X-ray-like limbs and skulls in the chest phantoms' style, and chest phantoms with an
unusual acquisition (inverted, heavily blurred, over-exposed). Like the phantoms they are for
software tests and measurements only; they say nothing about real radiographs.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import cv2
import numpy as np

from pneumoedge.datasets.body_parts import render_limb, render_skull
from pneumoedge.datasets.drawing import band_noise, blur, pick_size, pt, to_uint8, work_shape
from pneumoedge.datasets.phantoms import KINDS as PHANTOM_KINDS
from pneumoedge.datasets.phantoms import PROVENANCE_FILE, render_phantom

log = logging.getLogger(__name__)

FOREIGN_KINDS = ("natural", "document", "uniform", "noise", "limb", "skull", "inverted", "blurred", "saturated")
#: Every tenth image (index 9, 19, ...) is written as PNG, the rest as JPEG.
PNG_EVERY = 10

_NOTICE = """\
SYNTHETIC DATA - NOT REAL PATIENTS - NOT FOR CLINICAL USE

These images were drawn by pneumoedge.datasets.foreign from simple shapes and random numbers
to test whether software notices images unlike chest X-rays (out-of-distribution images):
natural-looking scenes, documents, flat grey, noise, X-ray-like limbs and skulls, and chest
phantoms with an unusual acquisition. No image comes from a person or a real radiograph.
"""

Size = Union[int, tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]


# --- Things that are not X-rays ----------------------------------------------------------

def render_natural(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking outdoor scene (sky, hills, textured ground, a sun, trees, buildings): uint8 RGB (height, width, 3)."""
    h, w = work_shape(height, width)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform([0.1, 0.2, 0.45], [0.5, 0.6, 0.95]), rng.uniform([0.6, 0.55, 0.5], [1.0, 0.9, 0.95])
    img = np.broadcast_to(top * (1 - y) + bottom * y, (h, w, 3)).astype(np.float32).copy()  # sky
    if rng.random() < 0.6:
        sun = np.zeros((h, w), np.float32)
        cv2.circle(sun, pt(rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.3), h, w), int(rng.uniform(0.03, 0.06) * w), 1.0, -1, cv2.LINE_AA)
        img += blur(sun, 0.02 * w)[..., None] * np.float32([1.0, 0.9, 0.6]) * 0.6
    horizon = rng.uniform(0.35, 0.65)
    x = np.linspace(0, 1, w)
    for layer in range(int(rng.integers(2, 4))):  # hills, nearer ones lower and darker
        base = horizon + 0.06 * layer
        ridge = base - 0.08 * sum(rng.uniform(0.2, 1) * np.sin(f * 2 * np.pi * x + rng.uniform(0, 6)) for f in (0.7, 1.9, 4.3))
        outline = np.vstack([np.c_[x, ridge], [[1, 1.1], [0, 1.1]]]) * (w - 1, h - 1)
        hill = np.zeros((h, w), np.float32)
        cv2.fillPoly(hill, [np.round(outline).astype(np.int32)], 1.0, cv2.LINE_AA)
        colour = rng.uniform([0.15, 0.25, 0.1], [0.5, 0.6, 0.35]) * (1 - 0.15 * layer)
        shade = 1 + 0.25 * band_noise(rng, h, w, 1.0, 8.0)[..., None]  # grass, rock and shadows
        img = img * (1 - hill[..., None]) + hill[..., None] * colour * shade
    for _ in range(int(rng.integers(0, 6))):  # trees: a trunk and a leafy crown
        tx, ty = rng.uniform(0.05, 0.95), rng.uniform(horizon + 0.1, 0.95)
        size = 0.04 + 0.12 * (ty - horizon)
        cv2.rectangle(img, pt(tx - size * 0.08, ty - size, h, w), pt(tx + size * 0.08, ty, h, w), (0.25, 0.17, 0.1), -1, cv2.LINE_AA)
        cv2.ellipse(img, pt(tx, ty - size * 1.3, h, w), (int(size * 0.45 * w), int(size * 0.9 * w)), 0, 0, 360,
                    tuple(float(c) for c in rng.uniform([0.05, 0.2, 0.05], [0.2, 0.45, 0.15])), -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 4))):  # buildings with rows of windows
        bx, bw, bh = rng.uniform(0, 0.9), rng.uniform(0.06, 0.15), rng.uniform(0.1, 0.3)
        wall = tuple(float(c) for c in rng.uniform(0.35, 0.85, 3))
        cv2.rectangle(img, pt(bx, horizon + 0.1 - bh, h, w), pt(bx + bw, horizon + 0.1, h, w), wall, -1)
        for wy in np.arange(horizon + 0.12 - bh, horizon + 0.07, 0.04):
            for wx in np.arange(bx + 0.01, bx + bw - 0.02, 0.03):
                cv2.rectangle(img, pt(wx, wy, h, w), pt(wx + 0.015, wy + 0.02, h, w), (0.15, 0.2, 0.3), -1)
    img = cv2.resize(blur(img, 0.6), (width, height), interpolation=cv2.INTER_CUBIC)
    img += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(0.005, 0.02))
    return to_uint8(img)


_WORDS = ("patient", "name", "date", "ward", "report", "signed", "dose", "mg", "daily", "review", "clinic", "form",
          "record", "address", "phone", "notes", "total", "amount", "invoice", "payment", "account", "ref", "no.",
          "department", "consent", "the", "and", "of", "to", "for", "with", "by", "on", "as", "is", "was", "per")


def _words(rng: np.random.Generator, n: int) -> str:
    parts = [str(rng.integers(1, 9999)) if rng.random() < 0.12 else str(rng.choice(_WORDS)) for _ in range(n)]
    return " ".join(parts).capitalize()


def render_document(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A scanned form: white page, a title, text lines, a ruled table and a round stamp: uint8 (height, width)."""
    page = np.full((height, width), int(rng.integers(236, 252)), np.uint8)
    font = int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_PLAIN]))
    unit = min(height, width) / 1000  # font scale 1.0 is ~22 px tall
    scale = rng.uniform(0.5, 0.7) * unit * (1.6 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
    ink = int(rng.integers(10, 70))
    line = max(12, int(36 * unit * rng.uniform(0.9, 1.2)))
    left, right = int(width * rng.uniform(0.06, 0.1)), int(width * rng.uniform(0.9, 0.94))
    y = int(height * rng.uniform(0.07, 0.1))
    cv2.putText(page, _words(rng, 3).upper(), (left, y), font, scale * 1.8, ink, max(1, int(3 * unit)), cv2.LINE_AA)
    y += 2 * line
    chars = max(8, int((right - left) / (16 * scale / max(unit, 1e-6) * unit)))  # ~16 px per character at scale 1
    sections = ["text", "table", "text"] if rng.random() < 0.7 else ["table", "text"]
    for section in sections:
        if section == "text":
            for _ in range(int(rng.integers(4, 10))):
                if y > height * 0.92:
                    break
                n = int(rng.integers(max(2, chars // 9), max(3, chars // 6)))
                cv2.putText(page, _words(rng, n), (left, y), font, scale, ink, max(1, int(1.5 * unit)), cv2.LINE_AA)
                y += line
        else:
            rows, cols = int(rng.integers(4, 10)), int(rng.integers(3, 6))
            row_h = int(line * 1.2)
            bottom = min(int(height * 0.95), y + rows * row_h)
            edges = np.linspace(left, right, cols + 1).astype(int)
            for r_y in range(y, bottom + 1, row_h):
                cv2.line(page, (left, r_y), (right, r_y), ink, max(1, int(2 * unit)))
            for x in edges:
                cv2.line(page, (int(x), y), (int(x), bottom), ink, max(1, int(2 * unit)))
            for r_y in range(y, bottom - row_h + 1, row_h):
                for c in range(cols):
                    cell = _words(rng, 1) if c == 0 else f"{rng.uniform(0, 999):.2f}"
                    cv2.putText(page, cell, (int(edges[c]) + 6, r_y + int(row_h * 0.72)), font, scale * 0.9, ink, max(1, int(1.5 * unit)), cv2.LINE_AA)
            y = bottom + 2 * line
    stamp = np.zeros((height, width), np.uint8)  # a round rubber stamp, pale and tilted
    centre = (int(width * rng.uniform(0.6, 0.85)), int(height * rng.uniform(0.7, 0.88)))
    radius = int(min(height, width) * rng.uniform(0.08, 0.12))
    cv2.circle(stamp, centre, radius, 255, max(2, int(5 * unit)), cv2.LINE_AA)
    cv2.circle(stamp, centre, int(radius * 0.8), 255, max(1, int(2 * unit)), cv2.LINE_AA)
    cv2.putText(stamp, "RECEIVED", (centre[0] - int(radius * 0.62), centre[1] + int(radius * 0.1)), cv2.FONT_HERSHEY_DUPLEX,
                radius / 160, 255, max(1, int(3 * unit)), cv2.LINE_AA)
    stamp = cv2.warpAffine(stamp, cv2.getRotationMatrix2D(centre, rng.uniform(-30, 30), 1.0), (width, height))
    page = np.minimum(page, 255 - (stamp.astype(np.float32) * rng.uniform(0.3, 0.55)).astype(np.uint8))
    # The scanner: a slight skew on a white bed, a little blur and sensor noise.
    m = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-1.5, 1.5), 1.0)
    page = cv2.warpAffine(page, m, (width, height), flags=cv2.INTER_LINEAR, borderValue=int(rng.integers(240, 256)))
    page = blur(page.astype(np.float32), rng.uniform(0.4, 0.9) * unit)
    page += rng.standard_normal((height, width), dtype=np.float32) * np.float32(rng.uniform(1.0, 4.0))
    return np.clip(np.round(page), 0, 255).astype(np.uint8)


def render_uniform(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A flat grey image at one random level: uint8 (height, width)."""
    return np.full((height, width), int(rng.integers(0, 256)), np.uint8)


def render_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """White (uniform), Gaussian or salt-and-pepper noise: uint8 (height, width)."""
    variant = int(rng.integers(3))
    if variant == 0:
        return rng.integers(0, 256, (height, width), dtype=np.uint8)
    if variant == 1:
        img = rng.normal(rng.uniform(60, 200), rng.uniform(20, 70), (height, width))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)
    img = np.full((height, width), int(rng.integers(40, 216)), np.uint8)
    hit = rng.random((height, width))
    share = rng.uniform(0.05, 0.3)
    img[hit < share / 2] = 0
    img[(hit >= share / 2) & (hit < share)] = 255
    return img


# --- Chest phantoms with an unusual acquisition ------------------------------------------

def _phantom(rng: np.random.Generator, height: int, width: int, kind: Optional[str]) -> np.ndarray:
    kind = str(rng.choice(PHANTOM_KINDS)) if kind is None else kind
    return render_phantom(rng, kind, height, width)


def render_inverted(rng: np.random.Generator, height: int, width: int, kind: Optional[str] = None) -> np.ndarray:
    """The negative of a chest phantom (air white, bone black): uint8 (height, width).

    `kind` ("normal", "bacteria", "virus"; default: drawn from `rng`) fixes the phantom, so the
    result equals `255 - render_phantom(rng, kind, ...)` for the same generator state.
    """
    return 255 - _phantom(rng, height, width, kind)


def render_blurred(rng: np.random.Generator, height: int, width: int, kind: Optional[str] = None) -> np.ndarray:
    """A chest phantom under a heavy Gaussian blur (sigma 2-4 % of the width): uint8 (height, width)."""
    img = _phantom(rng, height, width, kind).astype(np.float32)
    sigma = rng.uniform(0.02, 0.04) * width
    # Blur at a fraction of the size, then scale back up: the same look as a 25-50 px kernel at
    # full size, at a twentieth of the cost.
    f = max(1, int(sigma // 6))
    small = cv2.resize(img, (max(8, width // f), max(8, height // f)), interpolation=cv2.INTER_AREA)
    img = cv2.resize(blur(small, sigma / f), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.round(np.clip(img, 0, 255)).astype(np.uint8)


def render_saturated(rng: np.random.Generator, height: int, width: int, kind: Optional[str] = None) -> np.ndarray:
    """A chest phantom with an extreme exposure: uint8 (height, width).

    Half burn the highlights (gain 3-5: the body and most of the lungs clip to white), half
    clip the lungs to black (a steep window set above the lungs' grey level).
    """
    img = _phantom(rng, height, width, kind).astype(np.float32) / 255
    if rng.random() < 0.5:
        out = img * rng.uniform(3.0, 5.0)
    else:
        out = (img - np.percentile(img, rng.uniform(55, 70))) * rng.uniform(4.0, 7.0)
    return to_uint8(out)


#: Kind -> generator(rng, height, width) -> uint8 (height, width), or (height, width, 3) RGB for "natural".
GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "natural": render_natural,
    "document": render_document,
    "uniform": render_uniform,
    "noise": render_noise,
    "limb": render_limb,
    "skull": render_skull,
    "inverted": render_inverted,
    "blurred": render_blurred,
    "saturated": render_saturated,
}


def render_foreign(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """One image of `kind` (see `FOREIGN_KINDS`); the same generator state gives the same pixels."""
    if kind not in GENERATORS:
        raise ValueError(f"kind must be one of {FOREIGN_KINDS}, got {kind!r}")
    if height < 32 or width < 32:
        raise ValueError(f"foreign images need at least 32x32 pixels, got {height}x{width}")
    return GENERATORS[kind](rng, height, width)


def _write_one(job: tuple[Path, str, np.random.SeedSequence, tuple[int, int], int]) -> Path:
    path, kind, seed, (height, width), quality = job
    img = render_foreign(np.random.default_rng(seed), kind, height, width)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    if path.suffix == ".png":
        ok, data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, data = cv2.imencode(".jpeg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(data.tobytes())
    return path


def write_foreign(
    root: Union[str, Path],
    *,
    per_kind: int = 20,
    size: Size = (1024, 1280),
    seed: int = 0,
    kinds: Sequence[str] = FOREIGN_KINDS,
    jpeg_quality: int = 90,
    workers: Optional[int] = None,
) -> dict[str, list[Path]]:
    """Write `per_kind` images of each kind to ROOT/<kind>/<kind>_0001.jpeg, ... (synthetic, no person).

    Args:
        root: output folder; the kind folders must be absent or empty, so stale images never mix in.
        per_kind: images per kind; every tenth (index 9, 19, ...) is a PNG, the rest JPEG.
        size: (height, width), ((hmin, hmax), (wmin, wmax)) for a random size per image, or an int.
        seed: every pixel and size is a function of it.
        kinds: which of `FOREIGN_KINDS` to write.
        jpeg_quality: for the JPEG files.
        workers: writer threads (default up to 4).

    Writes ROOT/PROVENANCE.txt (and README.txt) saying the images are synthetic. Returns
    kind -> paths, in file-name order.
    """
    root = Path(root)
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; kinds are {FOREIGN_KINDS}")
    if per_kind < 1:
        raise ValueError(f"per_kind must be at least 1, got {per_kind}")
    pick_size(size, np.random.default_rng(0))  # check the shape of `size` before writing anything
    for kind in kinds:
        folder = root / kind
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty; write into a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
    master = np.random.SeedSequence(seed)
    sizes = np.random.default_rng(master.spawn(1)[0])
    jobs, written = [], {}
    for kind in FOREIGN_KINDS:  # fixed order: a kind's images do not depend on which others are asked for
        seeds = master.spawn(per_kind)
        shapes = [pick_size(size, sizes) for _ in range(per_kind)]
        if kind not in kinds:
            continue
        paths = [root / kind / f"{kind}_{i + 1:04d}{'.png' if i % PNG_EVERY == PNG_EVERY - 1 else '.jpeg'}" for i in range(per_kind)]
        jobs += [(p, kind, s, shape, jpeg_quality) for p, s, shape in zip(paths, seeds, shapes)]
        written[kind] = paths
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenCV and numpy's big kernels release the GIL
        for _ in pool.map(_write_one, jobs):
            pass
    text = _NOTICE + (f"\nGenerator: pneumoedge.datasets.foreign.write_foreign(per_kind={per_kind}, size={size!r}, "
                      f"seed={seed}, kinds={list(kinds)!r}, jpeg_quality={jpeg_quality})\nImages: {len(jobs)}\n")
    (root / PROVENANCE_FILE).write_text(text, encoding="utf-8")
    (root / "README.txt").write_text(text, encoding="utf-8")
    log.info("wrote %d synthetic foreign images to %s", len(jobs), root)
    return written
