"""Bundles: manifest round trip, and each way a bundle or model file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pneumoedge
from pneumoedge.bundle import FORMAT_VERSION, BundleError, read_manifest
from tests.conftest import SPEC_GRAY
from tests.onnx_models import mean_model


def _edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_round_trip(bundle_dir: Path) -> None:
    manifest = read_manifest(bundle_dir)
    assert manifest.labels == ("NORMAL", "PNEUMONIA")
    assert manifest.threshold == 0.4
    assert [(m.name, m.weight, m.precision) for m in manifest.members] == [("gray", 1.0, "fp32"), ("rgb", 3.0, "fp32")]
    assert manifest.members[1].card.spec.color == "rgb"
    assert manifest.provenance == {"synthetic": True}
    assert all(len(m.sha256) == 64 for m in manifest.members)


def test_tampered_member_refused_naming_the_file(bundle_dir: Path) -> None:
    with open(bundle_dir / "rgb.fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"rgb\.fp32\.onnx: checksum mismatch"):
        pneumoedge.load(bundle_dir)


def test_missing_member_file(bundle_dir: Path) -> None:
    (bundle_dir / "gray.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="gray.fp32.onnx is missing"):
        read_manifest(bundle_dir)


def test_newer_format_refused(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this pneumoedge understands"):
        read_manifest(bundle_dir)


def test_member_outside_bundle_refused(bundle_dir: Path, tmp_path: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d["members"][0].update(file="../gray.onnx"))
    with pytest.raises(BundleError, match="outside the bundle folder"):
        read_manifest(bundle_dir)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_binary_bundle_needs_threshold(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d.update(threshold=1.5))
    with pytest.raises(BundleError, match="threshold between 0 and 1"):
        read_manifest(bundle_dir)


def test_missing_precision_is_named(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="has no int8 members \\(it has: fp32\\)"):
        pneumoedge.load(bundle_dir, precision="int8")


def test_input_shape_must_fit_spec(tmp_path: Path) -> None:
    path = mean_model(tmp_path / "m.onnx", SPEC_GRAY, input_shape=(16, 16, 1))
    with pytest.raises(BundleError, match=r"m\.onnx: ONNX input 'input' has shape .* does not fit its spec"):
        pneumoedge.load(path)


def test_members_must_share_labels(tmp_path: Path) -> None:
    a = mean_model(tmp_path / "a.onnx", SPEC_GRAY)
    b = mean_model(tmp_path / "b.onnx", SPEC_GRAY, labels=("HEALTHY", "SICK"))
    with pytest.raises(BundleError, match="members must share labels"):
        pneumoedge.load([a, b])


def test_bare_onnx_without_spec_says_how_to_declare(tmp_path: Path) -> None:
    path = mean_model(tmp_path / "bare.onnx", SPEC_GRAY, metadata=False)
    with pytest.raises(BundleError, match="does not describe its preprocessing.*pneumoedge export MODEL --size"):
        pneumoedge.load(path)


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not protobuf")
    with pytest.raises(BundleError, match="junk.onnx: not a loadable ONNX model"):
        pneumoedge.load(path)


def test_output_width_must_match_labels(tmp_path: Path) -> None:
    path = mean_model(tmp_path / "three.onnx", SPEC_GRAY, a=(1.0, 2.0, 3.0), b=(0.0, 0.0, 0.0), head="softmax")
    model = pneumoedge.load(path)  # a binary card on a 3-output model: caught on first run
    with pytest.raises(BundleError, match="outputs 3 values per image but has 2 labels"):
        model.predict(np.zeros((8, 8), np.uint8))


def test_manifest_is_readable_by_others(bundle_dir: Path) -> None:
    assert (bundle_dir / "manifest.json").stat().st_mode & 0o777 == 0o644
