"""Synthetic chest X-ray phantoms for tests, demos and benchmarks ONLY: not real patients, not for clinical use.

A phantom is drawn from simple shapes (thorax, lung fields, ribs, mediastinum, heart,
clavicles) with random anatomy and acquisition (exposure, contrast, gamma, noise, blur,
rotation, shift). BACTERIAL pneumonia adds one to three dense focal consolidations in a lung
field; VIRAL adds diffuse bilateral patchy and reticular opacities. Sign intensity varies from
obvious to faint, so a tiny CNN learns the classes in a few epochs without a perfect score.
Nothing here says anything about real radiographs or real models' accuracy.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from pneumoedge.datasets.drawing import BACKGROUND, Size, blur, pick_size, work_shape
from pneumoedge.datasets.kaggle import SPLITS, DatasetError

log = logging.getLogger(__name__)

KINDS = ("normal", "bacteria", "virus")
#: Kind -> (label folder, subtype) in the Kaggle layout.
KIND_CLASSES = {"normal": ("NORMAL", "NORMAL"), "bacteria": ("PNEUMONIA", "BACTERIAL"), "virus": ("PNEUMONIA", "VIRAL")}
#: Written into every generated folder; `is_synthetic` looks for it.
PROVENANCE_FILE = "PROVENANCE.txt"
#: 16-bit phantoms use 12 bits of range, like many detectors' raw output in a 16-bit container.
SIXTEEN_BIT_MAX = 4095

DEFAULT_COUNTS: dict[str, dict[str, int]] = {
    "train": {"normal": 40, "bacteria": 20, "virus": 20},
    "val": {"normal": 8, "bacteria": 4, "virus": 4},
    "test": {"normal": 16, "bacteria": 8, "virus": 8},
}

# Shapes are drawn at drawing.WORK_SIDE and resized, so cost and look do not depend on output size;
# noise is added at the output size so large images stay as costly to decode as real ones.

_NOTICE = """\
SYNTHETIC DATA - NOT REAL PATIENTS - NOT FOR CLINICAL USE

These images are chest X-ray phantoms drawn by pneumoedge.datasets.phantoms from simple
shapes and random numbers, for software tests, demos and benchmarks only. No image comes
from a person. Labels describe how each phantom was drawn, not a diagnosis. Accuracy
measured on them says nothing about performance on real radiographs.
"""


@dataclass
class _Anatomy:
    """What stays the same across one patient's images (positions as fractions of the image)."""

    cx: float
    body: tuple[float, float, float]  # centre y, half-width, half-height
    lung_cy: float
    lung_sep: float
    lung_axes: tuple[float, float]
    lung_tilt: float
    heart: tuple[float, float, float]  # x offset (to image right), half-width, half-height
    ribs: int
    rib_gap: float
    clavicles: bool
    vessel_seed: int
    # Bacterial consolidations: (side -1/+1, u, v inside the lung ellipse, size).
    foci: list[tuple[int, float, float, float]] = field(default_factory=list)


def _draw_anatomy(rng: np.random.Generator, kind: str) -> _Anatomy:
    anatomy = _Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        body=(0.56 + rng.uniform(-0.02, 0.02), rng.uniform(0.38, 0.46), rng.uniform(0.48, 0.58)),
        lung_cy=0.46 + rng.uniform(-0.03, 0.03),
        lung_sep=rng.uniform(0.16, 0.2),
        lung_axes=(rng.uniform(0.115, 0.15), rng.uniform(0.24, 0.3)),
        lung_tilt=rng.uniform(2.0, 9.0),
        heart=(rng.uniform(0.04, 0.08), rng.uniform(0.13, 0.17), rng.uniform(0.1, 0.13)),
        ribs=int(rng.integers(8, 11)),
        rib_gap=rng.uniform(0.05, 0.062),
        clavicles=bool(rng.random() < 0.85),
        vessel_seed=int(rng.integers(2**31)),
    )
    if kind == "bacteria":
        n = int(rng.choice([1, 1, 1, 2, 2, 3]))
        for _ in range(n):
            side = int(rng.choice([-1, 1]))
            # Lobar pneumonia favours the lower zones: v > 0 is below the lung's centre.
            anatomy.foci.append((side, rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.65), rng.uniform(0.06, 0.11)))
    return anatomy


def _ellipse(canvas: np.ndarray, centre, axes, angle: float, value: float = 1.0, arc=(0, 360), thickness: int = -1) -> None:
    h, w = canvas.shape
    c = (int(round(centre[0] * w)), int(round(centre[1] * h)))
    a = (max(1, int(round(axes[0] * w))), max(1, int(round(axes[1] * h))))
    cv2.ellipse(canvas, c, a, angle, arc[0], arc[1], value, thickness, cv2.LINE_AA)


def _lung_point(an: _Anatomy, side: int, u: float, v: float) -> tuple[float, float]:
    """A point inside the lung ellipse of one side (u, v in -1..1 of its half-axes)."""
    return (an.cx + side * an.lung_sep + u * an.lung_axes[0], an.lung_cy + v * an.lung_axes[1])


def _anatomy_image(an: _Anatomy, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation-like image (bright = dense) and the lung-field mask, both float32 in 0..1."""
    img = np.full((h, w), BACKGROUND, np.float32)
    body = np.zeros((h, w), np.float32)
    _ellipse(body, (an.cx, an.body[0]), an.body[1:], 0)
    # Shoulders and upper arms widen the soft tissue at the top.
    _ellipse(body, (an.cx, an.lung_cy - 0.18), (an.body[1] * 1.15, 0.16), 0)
    body = blur(body, 0.02 * w)
    img += 0.42 * body

    lungs = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        ax = an.lung_axes[0] * (0.9 if side > 0 else 1.0)  # the heart side is narrower
        _ellipse(lungs, (an.cx + side * an.lung_sep, an.lung_cy), (ax, an.lung_axes[1]), -side * an.lung_tilt)
    lungs = blur(lungs, 0.012 * w)
    img -= 0.28 * lungs

    vessels = np.zeros((h, w), np.float32)
    vrng = np.random.default_rng(an.vessel_seed)
    for side in (-1, 1):
        hilum = np.array([an.cx + side * 0.07, an.lung_cy + 0.02])
        for _ in range(9):
            point, angle = hilum.copy(), np.deg2rad(vrng.uniform(-70, 70)) + (0 if side > 0 else np.pi)
            for step in range(6):
                nxt = point + 0.035 * np.array([np.cos(angle), np.sin(angle)])
                cv2.line(vessels, (int(point[0] * w), int(point[1] * h)), (int(nxt[0] * w), int(nxt[1] * h)),
                         1.0 - step * 0.13, max(1, int(0.006 * w)), cv2.LINE_AA)
                point, angle = nxt, angle + vrng.normal(0, 0.35)
    img += 0.05 * blur(vessels, 0.003 * w) * lungs

    mediastinum = np.zeros((h, w), np.float32)
    top, bottom = an.lung_cy - an.lung_axes[1] - 0.05, an.lung_cy + an.lung_axes[1] + 0.1
    cv2.rectangle(mediastinum, (int((an.cx - 0.07) * w), int(top * h)), (int((an.cx + 0.07) * w), int(bottom * h)), 1.0, -1)
    img += 0.16 * blur(mediastinum, 0.02 * w)
    spine = np.zeros((h, w), np.float32)
    for y in np.arange(top, bottom, 0.035):  # vertebral bodies
        cv2.rectangle(spine, (int((an.cx - 0.022) * w), int(y * h)), (int((an.cx + 0.022) * w), int((y + 0.028) * h)), 1.0, -1)
    img += 0.1 * blur(spine, 0.004 * w)
    heart = np.zeros((h, w), np.float32)
    _ellipse(heart, (an.cx + an.heart[0], an.lung_cy + an.lung_axes[1] * 0.55), an.heart[1:], -15)
    img += 0.15 * blur(heart, 0.015 * w)

    ribs = np.zeros((h, w), np.float32)
    thickness = max(1, int(0.013 * h))
    for i in range(an.ribs):
        y = an.lung_cy - an.lung_axes[1] + 0.01 + i * an.rib_gap
        # Posterior ribs: from the spine, up over the top, then laterally and down.
        _ellipse(ribs, (an.cx - 0.02, y + 0.07), (an.lung_sep + an.lung_axes[0] + 0.02, 0.075), 0, 1.0, (180, 272), thickness)
        _ellipse(ribs, (an.cx + 0.02, y + 0.07), (an.lung_sep + an.lung_axes[0] + 0.02, 0.075), 0, 1.0, (268, 360), thickness)
    img += 0.075 * blur(ribs, 0.003 * w) * body
    if an.clavicles:
        clav = np.zeros((h, w), np.float32)
        y0 = an.lung_cy - an.lung_axes[1] - 0.01
        for side in (-1, 1):
            cv2.line(clav, (int((an.cx + side * 0.04) * w), int(y0 * h)),
                     (int((an.cx + side * 0.3) * w), int((y0 - 0.05) * h)), 1.0, max(1, int(0.016 * h)), cv2.LINE_AA)
        img += 0.12 * blur(clav, 0.004 * w)
    return img, lungs


def _severity(rng: np.random.Generator, low: float, high: float) -> float:
    # Mostly clear signs with a faint tail, so a small model learns fast but not perfectly.
    return rng.uniform(0.06, low) if rng.random() < 0.15 else rng.uniform(low, high)


def _pathology(an: _Anatomy, kind: str, rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """Extra density inside the lung fields for one image (zeros for normal)."""
    h, w = lungs.shape
    out = np.zeros((h, w), np.float32)
    if kind == "bacteria":
        severity = _severity(rng, 0.3, 0.6)
        for side, u, v, size in an.foci:
            focus = np.zeros((h, w), np.float32)
            for _ in range(int(rng.integers(3, 7))):  # lobes are irregular: a cluster of ellipses
                cu, cv = u + rng.normal(0, 0.15), v + rng.normal(0, 0.12)
                axes = (size * rng.uniform(0.5, 1.0), size * rng.uniform(0.5, 1.1))
                _ellipse(focus, _lung_point(an, side, cu, cv), axes, rng.uniform(0, 180))
            out += rng.uniform(0.7, 1.0) * blur(focus, rng.uniform(0.006, 0.016) * w)
        out = severity * np.minimum(out, 1.0)
    elif kind == "virus":
        severity = _severity(rng, 0.25, 0.5)
        patches = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(80, 180))):
            side = 1 if rng.random() < 0.5 else -1
            # Bilateral, denser around the hila and in the lower zones.
            u = np.clip(rng.normal(-0.25 * side, 0.45), -1, 1)
            v = np.clip(rng.normal(0.2, 0.45), -1, 1)
            x, y = _lung_point(an, side, u, v)
            r = max(1, int(rng.uniform(0.006, 0.018) * w))
            cv2.circle(patches, (int(x * w), int(y * h)), r, float(rng.uniform(0.3, 1.0)), -1, cv2.LINE_AA)
        patches = blur(patches, 0.006 * w)
        noise = rng.standard_normal((h, w)).astype(np.float32)
        reticular = np.abs(blur(noise, 0.004 * w) - blur(noise, 0.01 * w))  # band-passed: a fine network
        reticular /= float(reticular.max()) + 1e-6
        out = severity * np.minimum(0.8 * patches + 0.9 * reticular, 1.0)
    elif kind != "normal":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return out * lungs


def _acquire(
    img: np.ndarray, rng: np.random.Generator, height: int, width: int, density: Optional[np.ndarray] = None
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Position, resize, expose and add detector noise: (float32 image in 0..1 at the output size, moved density).

    `density` (a work-size map), when given, is moved and resized exactly like the image and
    returned; the random draws are the same either way, so the image does not change.
    """
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-3, 3), rng.uniform(0.95, 1.05))
    m[:, 2] += (rng.uniform(-0.04, 0.04) * w, rng.uniform(-0.04, 0.04) * h)
    moved = None
    if density is not None:
        warped = cv2.warpAffine(density, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
        moved = cv2.resize(warped, (width, height), interpolation=cv2.INTER_LINEAR)
    img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=BACKGROUND)
    if rng.random() < 0.5:  # a burned-in side marker, as on most real films
        marker = np.zeros((h, w), np.uint8)  # OpenCV 5 draws text on 8-bit images only
        cv2.putText(marker, "R" if rng.random() < 0.7 else "L", (int(0.06 * w), int(0.12 * h)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.002 * w, 255, max(1, int(0.006 * w)), cv2.LINE_AA)
        img = np.maximum(img, marker.astype(np.float32) * np.float32(0.9 / 255))
    shrinking = height * width < h * w
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    img = blur(img, rng.uniform(0.3, 1.0) * max(1.0, min(height, width) / 256))
    # Exposure: contrast, offset, a vertical gradient (anode heel effect), then gamma.
    ramp = np.linspace(-1, 1, height, dtype=np.float32)[:, None] * np.float32(rng.uniform(-0.04, 0.04))
    img = (img - BACKGROUND) * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.uniform(0.0, 0.06)) + ramp
    img = np.clip(img, 0, 1) ** np.float32(rng.uniform(0.85, 1.2))
    img += rng.standard_normal((height, width), dtype=np.float32) * np.float32(rng.uniform(0.006, 0.022))
    return np.clip(img, 0, 1), moved


def _render(
    anatomy: _Anatomy, rng: np.random.Generator, kind: str, height: int, width: int, with_signs: bool = False
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """One image (float32 0..1, output size), its lung mask before positioning (work size) and,
    `with_signs`, the drawn pathology density positioned like the image (output size)."""
    wh, ww = work_shape(height, width)
    img, lungs = _anatomy_image(anatomy, wh, ww)
    density = _pathology(anatomy, kind, rng, lungs)
    img, signs = _acquire(img + density, rng, height, width, density if with_signs else None)
    return img, lungs, signs


def _quantise(img: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    if sixteen_bit:
        return np.round(img * SIXTEEN_BIT_MAX).astype(np.uint16)
    return np.round(img * 255).astype(np.uint8)


def render_phantom(rng: np.random.Generator, kind: str, height: int, width: int, sixteen_bit: bool = False) -> np.ndarray:
    """Draw one synthetic chest X-ray phantom (not a real patient; tests, demos, benchmarks only).

    Args:
        rng: source of all randomness; the same generator state gives the same image.
        kind: "normal", "bacteria" or "virus".
        height, width: output size in pixels.
        sixteen_bit: uint16 with 12 bits of range (0..4095) instead of uint8.

    Returns:
        (height, width) uint8 or uint16 array.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if height < 16 or width < 16:
        raise ValueError(f"phantoms need at least 16x16 pixels, got {height}x{width}")
    img, _, _ = _render(_draw_anatomy(rng, kind), rng, kind, height, width)
    return _quantise(img, sixteen_bit)


def render_phantom_with_signs(
    rng: np.random.Generator, kind: str, height: int, width: int, sixteen_bit: bool = False, *, level: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """`render_phantom`'s image (identical for the same generator state) and where its signs are.

    The mask is True where the drawn pneumonia density (consolidations, patchy opacities) is at
    least `level` of its peak, after the same positioning as the image; all False for "normal".
    For measuring whether a heatmap points at the signs (synthetic: not a clinical measure).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    img, _, density = _render(_draw_anatomy(rng, kind), rng, kind, height, width, with_signs=True)
    peak = float(density.max())
    mask = density >= level * peak if peak > 0 else np.zeros(density.shape, dtype=bool)
    return _quantise(img, sixteen_bit), mask


@dataclass(frozen=True)
class _Job:
    path: Path
    kind: str
    anatomy_seed: np.random.SeedSequence
    image_seed: np.random.SeedSequence
    size: tuple[int, int]
    sixteen_bit: bool
    jpeg_quality: int


def _write(job: _Job) -> Path:
    anatomy = _draw_anatomy(np.random.default_rng(job.anatomy_seed), job.kind)
    img, _, _ = _render(anatomy, np.random.default_rng(job.image_seed), job.kind, *job.size)
    pixels = _quantise(img, job.sixteen_bit)
    if job.path.suffix == ".png":
        ok, data = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, data = cv2.imencode(".jpeg", pixels, [cv2.IMWRITE_JPEG_QUALITY, job.jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {job.path}")
    job.path.write_bytes(data.tobytes())
    return job.path


def _run(jobs: Sequence[_Job], workers: Optional[int]) -> None:
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            _write(job)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:  # imencode and most of cv2 release the GIL
        for _ in pool.map(_write, jobs):
            pass


def _write_notice(folder: Path, details: str) -> None:
    text = _NOTICE + "\n" + details
    (folder / PROVENANCE_FILE).write_text(text, encoding="utf-8")
    (folder / "README.txt").write_text(text, encoding="utf-8")


def is_synthetic(root: Union[str, Path]) -> bool:
    """Whether a folder was written by this module (it holds our PROVENANCE.txt)."""
    path = Path(root) / PROVENANCE_FILE
    return path.is_file() and path.read_text(encoding="utf-8", errors="replace").startswith(_NOTICE.splitlines()[0])


def generate_dataset(
    root: Union[str, Path],
    *,
    counts: Optional[dict[str, dict[str, int]]] = None,
    size: Size = (256, 256),
    seed: int = 0,
    sixteen_bit_fraction: float = 0.0,
    jpeg_quality: int = 90,
    workers: Optional[int] = None,
) -> Path:
    """Write a synthetic data set in the Kaggle layout ROOT/{split}/{NORMAL,PNEUMONIA}/ (not real patients).

    Args:
        root: output folder; the split/label folders it writes to must be absent or empty,
            so stale images never mix with new ones.
        counts: images per split and kind, e.g. {"train": {"normal": 40, "bacteria": 20,
            "virus": 20}}; default `DEFAULT_COUNTS`.
        size: (height, width), or ((hmin, hmax), (wmin, wmax)) for a random size per image
            (bounds inclusive); an int means square.
        seed: everything (anatomy, signs, names, sizes) is a function of it.
        sixteen_bit_fraction: share of images written as 16-bit PNG (12 bits used), same names.
        jpeg_quality: for the 8-bit images.
        workers: writer threads (default up to 4).

    Names follow Kaggle: NORMAL `IM-0007-0002.jpeg` / `NORMAL2-IM-0012-0001.jpeg`, PNEUMONIA
    `person12_bacteria_40.jpeg`. Each patient has one to three images sharing anatomy (and a
    bacterial patient's foci), patient ids are unique across splits, so patient-level
    splitting matters as it does with the real data. Returns `root`.
    """
    root = Path(root)
    counts = DEFAULT_COUNTS if counts is None else counts
    for split, per_kind in counts.items():
        if split not in SPLITS:
            raise DatasetError(f"counts has split {split!r}; splits are {SPLITS}")
        for kind, n in per_kind.items():
            if kind not in KINDS or int(n) < 0:
                raise DatasetError(f"counts[{split!r}] needs kinds from {KINDS} with counts >= 0, got {kind!r}: {n!r}")
    if not 0.0 <= sixteen_bit_fraction <= 1.0:
        raise ValueError(f"sixteen_bit_fraction must be in 0..1, got {sixteen_bit_fraction}")
    pick_size(size, np.random.default_rng(0))  # validate the shape of `size` before writing anything

    folders = {(split, label) for split in counts for label in ("NORMAL", "PNEUMONIA")}
    for split, label in sorted(folders):
        folder = root / split / label
        if folder.is_dir() and any(folder.iterdir()):
            raise DatasetError(f"{folder} is not empty; generate into a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)

    jobs = _plan(root, counts, size, seed, sixteen_bit_fraction, jpeg_quality)
    _run(jobs, workers)
    _write_notice(
        root,
        f"Generator: pneumoedge.datasets.phantoms.generate_dataset(seed={seed}, size={size!r}, "
        f"sixteen_bit_fraction={sixteen_bit_fraction}, jpeg_quality={jpeg_quality})\n"
        f"Counts: {counts!r}\nImages: {len(jobs)}\n",
    )
    log.info("wrote %d synthetic phantom images to %s", len(jobs), root)
    return root


def _plan(root: Path, counts: dict[str, dict[str, int]], size: Size, seed: int, sixteen_bit_fraction: float,
          jpeg_quality: int) -> list[_Job]:
    """Every image to write: patients (one to three images each), Kaggle-style names, seeds from `seed`."""
    master = np.random.SeedSequence(seed)
    rng = np.random.default_rng(master.spawn(1)[0])
    next_normal, next_person, next_image = 1, 1, 1
    jobs: list[_Job] = []
    for split in SPLITS:  # fixed order: ids and seeds do not depend on the dict's order
        for kind in KINDS:
            remaining = int(counts.get(split, {}).get(kind, 0))
            label = KIND_CLASSES[kind][0]
            while remaining > 0:
                n = min(remaining, int(rng.choice([1, 1, 2, 2, 3])))
                remaining -= n
                anatomy_seed, *image_seeds = master.spawn(n + 1)
                if kind == "normal":
                    prefix = "NORMAL2-" if rng.random() < 0.3 else ""
                    stems = [f"{prefix}IM-{next_normal:04d}-{j:04d}" for j in range(1, n + 1)]
                    next_normal += 1
                else:
                    stems = [f"person{next_person}_{kind}_{next_image + j}" for j in range(n)]
                    next_person, next_image = next_person + 1, next_image + n
                for stem, image_seed in zip(stems, image_seeds):
                    sixteen = bool(rng.random() < sixteen_bit_fraction)
                    path = root / split / label / (stem + (".png" if sixteen else ".jpeg"))
                    jobs.append(_Job(path, kind, anatomy_seed, image_seed, pick_size(size, rng), sixteen, jpeg_quality))
    return jobs


#: Example images at the size of real chest X-rays (1-2 Mpx), so demos pay real decode costs.
EXAMPLE_SIZE: Size = ((1100, 1500), (1000, 1400))
#: 12-bit noise compresses poorly: a 1.7 Mpx 16-bit PNG is ~2 MB, so the example PNG is 0.86 Mpx (~1.2 MB).
EXAMPLE_PNG_SIZE: Size = (960, 900)


def write_examples(
    folder: Union[str, Path],
    n: int = 8,
    seed: int = 1234,
    size: Size = EXAMPLE_SIZE,
    jpeg_quality: int = 90,
    png_size: Optional[Size] = EXAMPLE_PNG_SIZE,
) -> list[Path]:
    """Write `n` flat example phantoms (`example_01.jpeg`, ...; one 16-bit PNG) for demos.

    `size` as in `generate_dataset`; `png_size` is the 16-bit PNG's (None: as `size`).
    Names do not reveal the class: the truth is in `LABELS.csv` (file, truth, subtype) beside
    them, with a README.txt saying they are synthetic. Returns the image paths.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    master = np.random.SeedSequence(seed)
    rng = np.random.default_rng(master.spawn(1)[0])
    kinds = [KINDS[i] for i in rng.permutation(np.arange(n) % len(KINDS))]
    sixteen_at = int(rng.integers(n))
    jobs = []
    for i, (kind, job_seed) in enumerate(zip(kinds, master.spawn(n))):
        suffix = ".png" if i == sixteen_at else ".jpeg"
        anatomy_seed, image_seed = job_seed.spawn(2)
        path = folder / f"example_{i + 1:02d}{suffix}"
        shape = pick_size(size, rng)
        if i == sixteen_at and png_size is not None:
            shape = pick_size(png_size, rng)
        jobs.append(_Job(path, kind, anatomy_seed, image_seed, shape, i == sixteen_at, jpeg_quality))
    _run(jobs, None)
    with open(folder / "LABELS.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "truth", "subtype"])
        for job in jobs:
            writer.writerow([job.path.name, *KIND_CLASSES[job.kind]])
    _write_notice(folder, f"Generator: pneumoedge.datasets.phantoms.write_examples(n={n}, seed={seed}, size={size!r}, "
                  f"jpeg_quality={jpeg_quality}, png_size={png_size!r})\n"
                  "Truth for each file: LABELS.csv (truth = binary label, subtype = kind of phantom).\n")
    return [job.path for job in jobs]
