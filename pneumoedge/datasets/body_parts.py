"""X-ray-like images of body parts other than the chest (a limb, a skull), in the chest phantoms' style.

Drawn from shapes and seeded random numbers like `pneumoedge.datasets.phantoms` (dark
background, bright bones with cortical rims, soft tissue, blur, exposure, detector noise), so
that a chest classifier's out-of-distribution flag can be tested on radiographs of the wrong
body part. Synthetic: for software tests and measurements only.
"""

from __future__ import annotations

import cv2
import numpy as np

from pneumoedge.datasets.drawing import BACKGROUND, band_noise, blur, pt, to_uint8, work_shape

def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _bone(h: int, w: int, p0, p1, half_width: float, end0: float, end1: float, rng: np.random.Generator) -> np.ndarray:
    """Projected density of one long bone (work size, 0..~1): bright cortex, darker medulla, trabecular ends.

    p0, p1: the bone's ends as image fractions; half_width (shaft) and end0/end1 (the flared
    ends; 0 for a shaft that leaves the image) are half-widths as fractions of the width.
    """
    a, b = np.array(p0, float) * (w, h), np.array(p1, float) * (w, h)
    length = float(np.linalg.norm(b - a))
    along = (b - a) / max(length, 1e-6)
    across = np.array([-along[1], along[0]])
    t = np.linspace(0, 1, 48)
    flare = 0.2 * length
    radius = half_width * w + sum(  # metaphyses widen smoothly into the epiphyses
        max(0.0, end * w - half_width * w) * _smoothstep(1 - np.abs(t - at) * length / flare) for end, at in ((end0, 0.0), (end1, 1.0)))
    centre = a + np.outer(t, b - a)
    outline = np.vstack([centre + radius[:, None] * across, (centre - radius[:, None] * across)[::-1]])
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(outline).astype(np.int32)], 255, cv2.LINE_AA)
    ends = np.zeros((h, w), np.uint8)
    angle = float(np.degrees(np.arctan2(along[1], along[0])))
    for point, end, inward in ((a, end0, along), (b, end1, -along)):
        if end > 0:  # condyles: two rounded lobes across the joint, and spongy bone behind them
            for lobe in (-0.45, 0.45):
                c = point + inward * 0.25 * end * w + across * lobe * end * w
                cv2.ellipse(mask, tuple(np.round(c).astype(int)), (max(2, int(0.35 * end * w)), max(2, int(0.55 * end * w))), angle, 0, 360, 255, -1, cv2.LINE_AA)
            c = point + inward * 0.6 * end * w
            cv2.ellipse(ends, tuple(np.round(c).astype(int)), (max(2, int(1.0 * end * w)), max(2, int(0.95 * end * w))), angle, 0, 360, 255, -1, cv2.LINE_AA)
    dist = cv2.distanceTransform((mask > 127).astype(np.uint8), cv2.DIST_L2, 3)
    cortex = np.exp(-dist / max(1.0, 0.3 * half_width * w))  # path length through a tube peaks at its rim
    inside = mask.astype(np.float32) / 255
    spongy = blur(ends.astype(np.float32) / 255, 2.0) * inside
    texture = 0.5 + 0.5 * band_noise(rng, h, w, 0.5, 2.0)
    # Thick cortex along the shaft, thin over the ends; the ends' trabeculae give them a grain.
    density = inside * (0.32 + 0.62 * cortex * (1 - 0.6 * spongy)) + spongy * (0.12 * texture - 0.05)
    return blur(density, 0.6)


def _soft_tissue(h: int, w: int, cx: float, half_width: float, rng: np.random.Generator) -> np.ndarray:
    """A limb's soft tissue: a band whose width swells and narrows along its length (0..1)."""
    y = np.linspace(-0.3, 1.3, 40)
    half = half_width * (1 + 0.12 * np.sin(rng.uniform(2, 5) * y + rng.uniform(0, 6)) + 0.08 * (y - 0.5))
    x = cx + 0.02 * np.sin(rng.uniform(1, 3) * y)
    outline = np.vstack([np.c_[x - half, y], np.c_[x + half, y][::-1]]) * (w, h)
    soft = np.zeros((h, w), np.float32)
    cv2.fillPoly(soft, [np.round(outline).astype(np.int32)], 1.0, cv2.LINE_AA)
    return blur(soft, 0.015 * w)


def _limb_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Attenuation-like image of a knee, elbow, forearm or whole long bone, about vertical (work size)."""
    variant = rng.choice(["knee", "elbow", "forearm", "long_bone"])
    cx = 0.5 + rng.normal(0, 0.03)
    joint_y = rng.uniform(0.42, 0.58)
    scale = rng.uniform(0.85, 1.15) * h / w  # sized by the image height: limbs run along it
    shaft = 0.028 * scale
    bones: list[np.ndarray] = []
    gap = rng.uniform(0.012, 0.025)
    if variant in ("knee", "elbow"):
        big = 0.085 if variant == "knee" else 0.07
        bones.append(_bone(h, w, (cx + rng.normal(0, 0.01), -0.2), (cx, joint_y - gap / 2), shaft, 0, big * scale, rng))
        if variant == "knee":  # tibia, the fibula beside it, the patella over the joint
            bones.append(_bone(h, w, (cx - 0.005, joint_y + gap / 2), (cx - 0.01, 1.2), shaft * 0.95, big * 0.95 * scale, 0, rng))
            fx = cx + 0.07 * scale * rng.choice([-1, 1])
            bones.append(_bone(h, w, (fx, joint_y + gap / 2 + 0.07), (fx + 0.01, 1.2), shaft * 0.35, 0.02 * scale, 0, rng))
            patella = np.zeros((h, w), np.float32)
            cv2.ellipse(patella, pt(cx + 0.01, joint_y - 0.05 * scale, h, w), (int(0.04 * scale * w), int(0.055 * scale * w)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
            bones.append(0.25 * blur(patella, 2.0))
            tissue_half = 0.2 * scale
        else:  # radius and ulna below the humerus
            for dx, half, end in ((-0.03, 0.55, 0.03), (0.035, 0.6, 0.035)):
                bones.append(_bone(h, w, (cx + dx * scale, joint_y + gap / 2), (cx + dx * scale * 0.5 + rng.normal(0, 0.01), 1.2), shaft * half, end * scale, 0, rng))
            tissue_half = 0.15 * scale
    elif variant == "forearm":  # radius and ulna crossing slightly, wrist bones at the bottom
        for x0, x1, half, end in ((-0.03, 0.03, 0.5, 0.045), (0.03, -0.025, 0.45, 0.03)):
            bones.append(_bone(h, w, (cx + x0 * scale, 0.02), (cx + x1 * scale, 0.76), shaft * half, 0.025 * scale, end * scale, rng))
        carpals = np.zeros((h, w), np.float32)
        for _ in range(7):
            cv2.ellipse(carpals, pt(cx + rng.uniform(-0.05, 0.05) * scale, rng.uniform(0.8, 0.9), h, w),
                        (int(rng.uniform(0.012, 0.02) * scale * w), int(rng.uniform(0.01, 0.016) * scale * w)),
                        rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
        bones.append(0.45 * blur(carpals, 1.2))
        tissue_half = 0.11 * scale
    else:  # a whole humerus or femur with both ends
        bones.append(_bone(h, w, (cx, 0.1), (cx + rng.normal(0, 0.02), 0.9), shaft, 0.06 * scale, 0.075 * scale, rng))
        tissue_half = 0.18 * scale
    soft = _soft_tissue(h, w, cx, tissue_half, rng)
    muscle = blur(soft * (0.5 + 0.5 * band_noise(rng, h, w, 6, 20)), 3)  # uneven muscle and fat
    img = np.full((h, w), BACKGROUND, np.float32) + 0.2 * soft + 0.05 * muscle
    img += rng.uniform(0.5, 0.65) * sum(bones)
    return img


def _ring(canvas: np.ndarray, centre, axes, thickness: int, value: float, arc=(0, 360)) -> None:
    cv2.ellipse(canvas, centre, axes, 0, arc[0], arc[1], value, thickness, cv2.LINE_AA)


def _skull_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Attenuation-like frontal skull: vault with diploe, orbits, nasal cavity, sinuses, jaw, teeth, cervical spine."""
    ay = h * rng.uniform(0.32, 0.36)
    ax = ay * rng.uniform(0.82, 0.92)
    cx, cy = w * (0.5 + rng.normal(0, 0.015)), h * rng.uniform(0.04, 0.07) + ay
    centre, axes = (int(cx), int(cy)), (int(ax), int(ay))
    s = ay

    def at(u: float, v: float) -> tuple[int, int]:  # a point in units of the vault's half-axes
        return int(round(cx + u * ax)), int(round(cy + v * ay))

    img = np.full((h, w), BACKGROUND, np.float32)
    head = np.zeros((h, w), np.float32)
    cv2.ellipse(head, centre, (int(ax * 1.07), int(ay * 1.06)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    cv2.ellipse(head, at(0, 0.9), (int(ax * 0.8), int(ay * 0.55)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    cv2.rectangle(head, at(-0.5, 1.1), (int(cx + 0.5 * ax), h), 1.0, -1)  # neck
    img += 0.2 * blur(head, 0.03 * s)

    # Vault: the shell seen edge-on at the rim (bright), twice face-on inside (moderate), down to the skull base.
    upper = np.zeros((h, w), np.float32)
    cv2.ellipse(upper, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    upper *= _smoothstep((cy + 0.45 * ay - np.arange(h, dtype=np.float32)[:, None]) / (0.3 * ay))
    shell = max(3, int(0.07 * s))
    arc = (155, 385)  # the sides and top; the face hides the lower rim
    rim = np.zeros((h, w), np.float32)
    _ring(rim, centre, (int(ax - shell / 2), int(ay - shell / 2)), shell, 1.0, arc)
    tables = np.zeros((h, w), np.float32)
    _ring(tables, centre, (int(ax - 1), int(ay - 1)), 2, 1.0, arc)
    _ring(tables, centre, (int(ax - shell), int(ay - shell)), 2, 1.0, arc)
    diploe = 0.5 + 0.5 * band_noise(rng, h, w, 0.6, 2.5)
    img += 0.2 * blur(upper, 2.0) * (0.85 + 0.3 * band_noise(rng, h, w, 4, 15))
    img += 0.22 * blur(rim, 1.0) * (0.5 + 0.5 * diploe) + 0.18 * blur(tables, 0.8)
    grooves = np.zeros((h, w), np.float32)  # vascular grooves and sutures: faint dark lines
    for _ in range(int(rng.integers(4, 9))):
        p = np.array(at(rng.uniform(-0.6, 0.6), -rng.uniform(0.2, 0.9)), float)
        a = rng.uniform(0, 2 * np.pi)
        for _ in range(8):
            q = p + 0.08 * s * np.array([np.cos(a), np.sin(a)])
            cv2.line(grooves, tuple(p.astype(int)), tuple(q.astype(int)), 1.0, 1, cv2.LINE_AA)
            p, a = q, a + rng.normal(0, 0.4)
    img -= 0.04 * blur(grooves, 0.8) * upper

    bone, air = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    for side in (-1, 1):
        for u0, v0, u1, v1 in ((0.98, 0.35, 0.8, 0.85), (0.8, 0.85, 0.66, 1.0)):  # zygoma and maxilla outline
            cv2.line(bone, at(side * u0, v0), at(side * u1, v1), 0.7, max(2, int(0.04 * s)), cv2.LINE_AA)
        orbit = at(side * 0.4, 0.3)
        cv2.ellipse(air, orbit, (int(ax * 0.21), int(ay * 0.16)), side * 8, 0, 360, 1.0, -1, cv2.LINE_AA)
        cv2.ellipse(bone, orbit, (int(ax * 0.21), int(ay * 0.16)), side * 8, 0, 360, 1.0, max(2, int(0.025 * s)), cv2.LINE_AA)
        cv2.line(bone, at(side * 0.12, 0.55), at(side * 0.9, 0.4), 0.9, max(2, int(0.06 * s)), cv2.LINE_AA)  # petrous ridges
        cv2.ellipse(air, at(side * 0.3, 0.62), (int(ax * 0.16), int(ay * 0.12)), 0, 0, 360, 0.7, -1, cv2.LINE_AA)  # maxillary sinuses
    cv2.fillPoly(air, [np.array([at(0, 0.38), at(-0.12, 0.76), at(0.12, 0.76)], np.int32)], 0.9, cv2.LINE_AA)  # nasal cavity
    cv2.line(bone, at(0, 0.42), at(0, 0.76), 0.6, max(1, int(0.012 * s)), cv2.LINE_AA)  # septum
    img += 0.22 * blur(bone, 1.2) - 0.1 * blur(air, 1.5)

    jaw, teeth = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    cv2.ellipse(jaw, at(0, 0.98), (int(ax * 0.66), int(ay * 0.42)), 0, 5, 175, 1.0, max(3, int(0.09 * s)), cv2.LINE_AA)  # mandible
    for side in (-1, 1):  # rami up to the jaw joints
        cv2.line(jaw, at(side * 0.65, 1.03), at(side * 0.76, 0.55), 1.0, max(3, int(0.1 * s)), cv2.LINE_AA)
    for row, v in ((0, 1.0), (1, 1.02)):
        for k in range(-7, 8):
            u = k * 0.052
            lift = 0.15 * u * u  # the dental arch curves up at the sides
            tall = rng.uniform(0.09, 0.12) * (1 - 0.03 * abs(k))
            top = v - lift - tall if row == 0 else v - lift
            cv2.rectangle(teeth, at(u - 0.021, top), at(u + 0.021, top + tall), 1.0, -1)
    img += 0.25 * blur(jaw, 1.5) + 0.35 * blur(teeth, 1.0)

    spine = np.zeros((h, w), np.float32)
    v = 1.05
    while cy + v * ay < h:  # cervical vertebral bodies with their disc spaces
        cv2.rectangle(spine, at(-0.16, v), at(0.16, v + 0.13), 1.0, -1)
        v += 0.17
    img += 0.2 * blur(spine, 1.5)
    return img


def _acquire_xray(img: np.ndarray, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Rotate, resize, blur, expose, add detector noise and maybe a side marker; uint8 at the output size."""
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-20, 20), rng.uniform(0.9, 1.05))
    m[:, 2] += (rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h)
    img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=BACKGROUND)
    if rng.random() < 0.6:
        marker = np.zeros((h, w), np.uint8)
        cv2.putText(marker, "R" if rng.random() < 0.5 else "L", (int(rng.uniform(0.05, 0.8) * w), int(0.12 * h)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.002 * w, 255, max(1, int(0.006 * w)), cv2.LINE_AA)
        img = np.maximum(img, marker.astype(np.float32) * np.float32(0.9 / 255))
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if height * width < h * w else cv2.INTER_CUBIC)
    img = blur(img, rng.uniform(0.3, 1.0) * max(1.0, min(height, width) / 256))
    img = (img - BACKGROUND) * np.float32(rng.uniform(0.9, 1.2)) + np.float32(rng.uniform(0.0, 0.05))
    img = np.clip(img, 0, 1) ** np.float32(rng.uniform(0.8, 1.2))
    img += rng.standard_normal((height, width), dtype=np.float32) * np.float32(rng.uniform(0.006, 0.02))
    return to_uint8(img)


def render_limb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An X-ray-like limb (knee, elbow, forearm or a whole long bone): uint8 (height, width)."""
    return _acquire_xray(_limb_image(rng, *work_shape(height, width)), rng, height, width)


def render_skull(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An X-ray-like frontal skull: uint8 (height, width)."""
    return _acquire_xray(_skull_image(rng, *work_shape(height, width)), rng, height, width)
