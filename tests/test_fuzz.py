"""Mutated PNG/JPEG/DICOM bytes through decode and preprocess: a tensor or a clean ImageError, nothing else.

Bounded for CI (150 examples per format, derandomized so a failure reproduces); raise
`max_examples` locally to search longer.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pneumoedge.imageio import ImageError
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from tests.conftest import gradient_image
from tests.input_files import dicom_bytes, encoded

SPEC = PreprocessSpec(height=16, width=16, color="rgb")
SPEC_REDUCED = PreprocessSpec(height=16, width=16, color="gray", decode_reduction=2)


def _seeds() -> dict[str, bytes]:
    gray = gradient_image(24, 20, 11)
    seeds = {
        "png": encoded(".png", gray),
        "png16": encoded(".png", gradient_image(24, 20, 12, dtype=np.uint16)),
        "jpeg": encoded(".jpg", gradient_image(24, 20, 13, channels=3)),
        "jpeg_progressive": encoded(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    }
    try:
        twelve = (np.arange(24 * 20) * 9 % 4096).astype(np.uint16).reshape(24, 20)
        seeds["dicom"] = dicom_bytes(twelve, bits_stored=12, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=1500, RescaleSlope=1, RescaleIntercept=-100)
    except ImportError:  # pydicom not installed: the DICOM seeds are skipped below
        pass
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """A few bit flips, byte overwrites, insertions, deletions and a possible truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate"]))
        # Half the edits land in the first 200 bytes, where the headers are.
        at = draw(st.integers(0, max(0, min(len(data), 200) - 1)) | st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def _check(data: bytes) -> None:
    for spec in (SPEC, SPEC_REDUCED):
        try:
            tensor = preprocess(data, spec)
        except ImageError as exc:
            assert str(exc), "an ImageError must say what is wrong"
            continue
        assert tensor.shape == spec.input_shape and tensor.dtype == np.float32
        assert np.isfinite(tensor).all()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every odd value it meets
@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_mutated_files_give_a_tensor_or_a_clean_error(kind: str) -> None:
    if kind == "dicom":
        pytest.importorskip("pydicom")
    _check(SEEDS[kind])  # the seed itself decodes

    @settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(SEEDS[kind]))
    def run(data: bytes) -> None:
        _check(data)

    run()
