"""THE preprocessing: decode, map bit depth, convert colour, resize, scale; a pure function of a spec.

Training (`pneumoedge.export`) and the runtime both call `preprocess`, so the tensor a model
saw in training is the tensor it sees at the clinic, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import cv2
import numpy as np

from pneumoedge.imageio import ImageSource, read_pixels

#: Resize methods by name -> OpenCV flag. Which training pipeline each one reproduces is in the
#: README ("Declaring a foreign model's preprocessing"); resizing happens on float32 pixels.
RESIZE_METHODS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,  # OpenCV's own nearest (rounds coordinates down)
    "nearest_exact": cv2.INTER_NEAREST_EXACT,  # PIL / Keras load_img nearest
    "bilinear": cv2.INTER_LINEAR,  # tf.image.resize bilinear (half-pixel centres)
    "area": cv2.INTER_AREA,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}

#: Methods whose result on each channel does not depend on the others, bit for bit, in OpenCV's
#: float32 resize (bicubic and Lanczos differ in the last bits between 1 and 3 channels).
CHANNEL_EXACT_RESIZE = frozenset({"nearest", "nearest_exact", "bilinear", "area"})
COLORS = ("gray", "rgb")
LAYOUTS = ("NHWC", "NCHW")
#: How pixels deeper than 8 bits reach the 0..255 range the scaling expects.
HIGH_BIT_DEPTH = ("min_max", "full_range")
#: Which VOI a DICOM image is rendered through (see `pneumoedge.dicom`).
DICOM_VOI = ("file", "min_max")


class SpecError(ValueError):
    """A preprocessing spec that is malformed or cannot be honoured."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image file becomes a model input tensor.

    Pixels are first mapped to float32 in 0..255 (8-bit as is; 16-bit by `high_bit_depth`;
    DICOM rendered like a viewer, through its modality LUT, the VOI that `dicom_voi` picks
    and MONOCHROME1 inversion, whatever `high_bit_depth` says: see docs/inputs.md),
    converted to `color`, resized to `height` x `width` with `resize`, then
    `x * scale + offset`, then `(x - mean) / std` per channel when mean/std are given.
    """

    height: int = 256
    width: int = 256
    color: str = "gray"
    resize: str = "area"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    layout: str = "NHWC"
    dtype: str = "float32"
    high_bit_depth: str = "min_max"
    #: JPEG decode at 1/N scale (1, 2, 4, 8): a large speed-up, but it changes pixels, so only
    #: for models trained through this same function.
    decode_reduction: int = 1
    #: DICOM VOI: "file" (its VOI LUT, else its window, else min..max) or "min_max" (ignore
    #: the file's window). Left out of `to_dict` at its default, so specs written before it
    #: existed, and the manifests holding them, stay as they were.
    dicom_voi: str = "file"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        if self.std is not None:
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if not (isinstance(self.height, int) and isinstance(self.width, int) and self.height > 0 and self.width > 0):
            problems.append(f"height and width must be positive integers, got {self.height}x{self.width}")
        if self.color not in COLORS:
            problems.append(f"color must be one of {COLORS}, got {self.color!r}")
        if self.resize not in RESIZE_METHODS:
            problems.append(f"resize must be one of {sorted(RESIZE_METHODS)}, got {self.resize!r}")
        if self.layout not in LAYOUTS:
            problems.append(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.dtype != "float32":
            problems.append(f"dtype must be 'float32', got {self.dtype!r}")
        if self.high_bit_depth not in HIGH_BIT_DEPTH:
            problems.append(f"high_bit_depth must be one of {HIGH_BIT_DEPTH}, got {self.high_bit_depth!r}")
        if self.dicom_voi not in DICOM_VOI:
            problems.append(f"dicom_voi must be one of {DICOM_VOI}, got {self.dicom_voi!r}")
        if self.decode_reduction not in (1, 2, 4, 8):
            problems.append(f"decode_reduction must be 1, 2, 4 or 8, got {self.decode_reduction!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, self.channels):
                problems.append(f"{name} needs 1 or {self.channels} values, got {len(value)}")
        if self.std is not None and any(v == 0 for v in self.std):
            problems.append("std values must be non-zero")
        if problems:
            raise SpecError("invalid preprocessing spec: " + "; ".join(problems))

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image's tensor, without the batch axis."""
        if self.layout == "NHWC":
            return (self.height, self.width, self.channels)
        return (self.channels, self.height, self.width)

    @property
    def decode_key(self) -> tuple[int, bool, str]:
        """Specs with the same key can share one decode of a file."""
        reduced = self.decode_reduction > 1
        return (self.decode_reduction, reduced and self.color == "gray", self.dicom_voi)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("mean", "std"):
            if data[name] is not None:
                data[name] = list(data[name])
        if not data["extra"]:
            del data["extra"]
        if data["dicom_voi"] == "file":
            del data["dicom_voi"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        if not isinstance(data, dict):
            raise SpecError(f"a preprocessing spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"preprocessing spec has unknown fields {unknown}; it may come from a newer pneumoedge"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"invalid preprocessing spec: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"preprocessing spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def read_for(source: ImageSource, spec: PreprocessSpec) -> np.ndarray:
    """Decode a source the way `spec` asks (see `PreprocessSpec.decode_key`)."""
    reduction, gray, dicom_voi = spec.decode_key
    return read_pixels(source, reduction=reduction, gray=gray, dicom_voi=dicom_voi)


def to_float_pixels(pixels: np.ndarray, high_bit_depth: str) -> np.ndarray:
    """Map decoded pixels to float32 in 0..255.

    uint8 as is; uint16 by `high_bit_depth`; float32 is DICOM already rendered to 0..255
    through its own window (`pneumoedge.dicom`), so it is taken as is.
    """
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    if pixels.dtype == np.float32:
        return pixels
    values = pixels.astype(np.float32)
    if high_bit_depth == "full_range":
        return values * np.float32(255.0 / 65535.0)
    # min_max: 12-bit data stored in 16 bits, or a narrow exposure, still fills 0..255.
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - np.float32(lo)) * np.float32(255.0 / (hi - lo))


def to_tensor(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turn decoded pixels (from `read_for`) into one float32 input tensor (no batch axis)."""
    x = to_float_pixels(pixels, spec.high_bit_depth)
    if spec.color == "gray" and x.ndim == 3:
        x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    # A gray image for an RGB model: resizing its one channel and copying it after gives the
    # same bits as resizing three equal channels (for these methods; a test holds it) at a third
    # of the cost on a 1-2 Mpx radiograph.
    replicate_after = spec.color == "rgb" and x.ndim == 2 and spec.resize in CHANNEL_EXACT_RESIZE
    if spec.color == "rgb" and x.ndim == 2 and not replicate_after:
        x = np.repeat(x[:, :, None], 3, axis=2)
    if x.shape[:2] != (spec.height, spec.width):
        x = cv2.resize(x, (spec.width, spec.height), interpolation=RESIZE_METHODS[spec.resize])
    if replicate_after:
        x = np.repeat(x[:, :, None], 3, axis=2)
    if x.ndim == 2:
        x = x[:, :, None]
    x = x * np.float32(spec.scale) + np.float32(spec.offset)
    if spec.mean is not None:
        x = x - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        x = x / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess(source: ImageSource, spec: PreprocessSpec) -> np.ndarray:
    """Decode `source` (path, encoded bytes or pixel array) and return its float32 tensor.

    The result has shape `spec.input_shape` (no batch axis).
    """
    return to_tensor(read_for(source, spec), spec)
