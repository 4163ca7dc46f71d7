"""`pneumoedge bundle create`: mixed ensembles (Keras-style NHWC gray 150 px + PyTorch-style NCHW RGB 224 px).

Both kinds of model are built with onnx.helper (tests/foreign_models.py); no TensorFlow needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import pneumoedge
from pneumoedge import imageio
from pneumoedge.bundle import MemberSource, ModelCard, read_manifest, sha256_file, write_bundle
from pneumoedge.cli import app
from pneumoedge import thresholds
from pneumoedge.export.onnx_wrap import wrap_onnx
from pneumoedge.export.quantization import RECIPES, quantize_with
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from tests.conftest import gradient_image
from tests.foreign_models import cnn

runner = CliRunner()
LABELS = ("NORMAL", "PNEUMONIA")
KERAS_SPEC = PreprocessSpec(height=150, width=150, color="gray", resize="area")
TORCH_SPEC = PreprocessSpec(height=224, width=224, color="rgb", resize="bilinear", mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225), layout="NCHW")


def invoke(args: list):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def _images(root: Path, count: int, seed: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), gradient_image(180 + 10 * i, 200, seed + i, channels=3 if i % 2 else 1))
        files.append(path)
    return files


def _int8(fp32: Path, spec: PreprocessSpec, card: ModelCard, target: Path, images: list[Path]) -> Path:
    calibration = np.stack([preprocess(p, spec) for p in images])
    return quantize_with(RECIPES["u8s8_per_tensor"], fp32, target, calibration, card)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """keras/ (2 NHWC gray 150 members, weights 1 and 3, fp32 + int8, threshold 0.4), torch.onnx (wrapped
    NCHW RGB 224, threshold 0.4), torch/ (the same in a bundle with int8), and images."""
    root = tmp_path_factory.mktemp("compose")
    images = _images(root / "images", 6, 10)
    sources = []
    for index, weight in ((1, 1.0), (2, 3.0)):
        fp32 = cnn(root / f"k{index}.onnx", size=(150, 150), channels=1, layout="NHWC", classes=1, head="sigmoid", seed=index)
        card = ModelCard(KERAS_SPEC, LABELS)
        sources.append(MemberSource(fp32, f"cnn{index}", KERAS_SPEC, "fp32", weight))
        sources.append(MemberSource(_int8(fp32, KERAS_SPEC, card, root / f"k{index}.int8.onnx", images), f"cnn{index}", KERAS_SPEC, "int8", weight))
    write_bundle(root / "keras", sources, labels=LABELS, threshold=0.4, threshold_method="declared 0.4",
                 provenance={"synthetic": True}, default_precision="fp32")
    torch_file = cnn(root / "resnet_like.onnx", size=(224, 224), channels=3, stride=4, seed=7)
    wrapped = wrap_onnx(torch_file, root / "torch.onnx", spec=TORCH_SPEC, labels=LABELS, head="logits", threshold=0.4)
    int8 = _int8(wrapped.onnx_path, TORCH_SPEC, wrapped.card, root / "torch.int8.onnx", images)
    write_bundle(root / "torch", [MemberSource(wrapped.onnx_path, "resnet_like", TORCH_SPEC, "fp32", 1.0, "softmax", wrapped.explain),
                                  MemberSource(int8, "resnet_like", TORCH_SPEC, "int8", 1.0, "softmax", wrapped.explain)],
                 labels=LABELS, threshold=0.4, threshold_method="declared 0.4")
    return {"root": root, "keras": root / "keras", "torch_onnx": root / "torch.onnx", "torch": root / "torch", "images": images}


def _p(model, files, precision="default") -> np.ndarray:
    ensemble = pneumoedge.load(model, precision=precision, threads=1)
    return np.array([p.probabilities["PNEUMONIA"] for p in ensemble.predict_many(files, batch_size=4)])


def test_mixed_bundle_is_the_weighted_mean_of_its_inputs_and_decodes_each_file_once(models: dict, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "ensemble"
    result = invoke(["bundle", "create", out, models["keras"], models["torch_onnx"], "--weights", "2,1"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.threshold == pytest.approx(0.4) and "carried over" in manifest.threshold_method
    assert manifest.precisions == ("fp32",)  # torch.onnx alone has no int8 twin
    assert "int8 members not carried over" in result.output
    assert {m.card.spec.layout for m in manifest.members} == {"NHWC", "NCHW"}
    files = models["images"]
    expected = (2 * _p(models["keras"], files, "fp32") + _p(models["torch_onnx"], files)) / 3
    decoded = []
    original = imageio.decode_bytes
    monkeypatch.setattr(imageio, "decode_bytes", lambda data, **kw: decoded.append(len(data)) or original(data, **kw))
    got = _p(out, files)
    assert np.abs(got - expected).max() < 1e-12
    assert len(decoded) == len(files)  # one decode per file for three members of two sizes and layouts
    # member weights: the keras bundle's 1:3 proportions inside its voice of 2/3
    weights = {m.name: m.weight for m in manifest.members}
    total = sum(weights.values())
    assert weights["cnn1"] / total == pytest.approx(2 / 3 * 1 / 4)
    assert weights["cnn2"] / total == pytest.approx(2 / 3 * 3 / 4)
    assert weights["torch"] / total == pytest.approx(1 / 3)


def test_int8_and_fp32_members_are_both_carried_over(models: dict, tmp_path: Path) -> None:
    out = tmp_path / "both"
    result = invoke(["bundle", "create", out, models["keras"], models["torch"], "--weights", "1,1"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.precisions == ("fp32", "int8")
    files = models["images"]
    for precision in ("fp32", "int8"):
        expected = (_p(models["keras"], files, precision) + _p(models["torch"], files, precision)) / 2
        assert np.abs(_p(out, files, precision) - expected).max() < 1e-12
    torch_int8 = next(m for m in manifest.members if m.precision == "int8" and m.origin["input"] == str(models["torch"]))
    assert torch_int8.card.explain and torch_int8.card.explain["heatmap_output"] == "pneumoedge_heatmap"


def test_manifest_records_origin_and_sha256_and_info_shows_them(models: dict, tmp_path: Path) -> None:
    out = tmp_path / "recorded"
    assert invoke(["bundle", "create", out, models["keras"], models["torch_onnx"]]).exit_code == 0
    data = json.loads((out / "manifest.json").read_text())
    for member in data["members"]:
        origin = member["origin"]
        source = Path(origin["input"]) / origin["file"] if origin["kind"] == "bundle" else Path(origin["input"])
        assert origin["sha256"] == sha256_file(source) == member["sha256"]
        assert (out / member["file"]).read_bytes() == source.read_bytes()
    torch_member = next(m for m in data["members"] if m["origin"]["kind"] == "onnx")
    assert torch_member["origin"]["previous_origin"]["sha256"] == sha256_file(models["root"] / "resnet_like.onnx")
    assert data["provenance"]["synthetic"] is True  # the keras input says so; the mix inherits it
    info = invoke(["info", out, "--json"])
    assert info.exit_code == 0, info.output
    shown = json.loads(info.output)
    assert [i["input"] for i in shown["provenance"]["inputs"]] == [str(models["keras"]), str(models["torch_onnx"])]


def _labelled(root: Path) -> Path:
    for label, seed in (("NORMAL", 100), ("PNEUMONIA", 200)):
        _images(root / label, 5, seed)
    return root


def test_threshold_disagreement_is_refused_then_chosen_on_validation(models: dict, tmp_path: Path) -> None:
    other = wrap_onnx(cnn(tmp_path / "o.onnx", size=(224, 224), channels=3, stride=4, seed=3), tmp_path / "other.onnx",
                      spec=TORCH_SPEC, labels=LABELS, head="logits", threshold=0.6).onnx_path
    refused = invoke(["bundle", "create", tmp_path / "x", models["keras"], other])
    assert refused.exit_code == 2 and "thresholds differ" in refused.output and "other.onnx: 0.6" in refused.output
    assert not (tmp_path / "x").exists()
    fixed = invoke(["bundle", "create", tmp_path / "fixed", models["keras"], other, "--threshold", "fixed:0.3"])
    assert fixed.exit_code == 0 and read_manifest(tmp_path / "fixed").threshold == pytest.approx(0.3)
    data = _labelled(tmp_path / "val")
    chosen = invoke(["bundle", "create", tmp_path / "chosen", models["keras"], other, "--validation", data])
    assert chosen.exit_code == 0, chosen.output
    manifest = read_manifest(tmp_path / "chosen")
    files = [*sorted((data / "NORMAL").iterdir()), *sorted((data / "PNEUMONIA").iterdir())]
    y = np.array([0] * 5 + [1] * 5)
    expected = thresholds.choose("sensitivity:0.95", y, _p(tmp_path / "chosen", files)).as_dict()
    assert manifest.threshold == pytest.approx(expected["threshold"])
    assert manifest.provenance["threshold"]["images"] == 10


def _mismatched_labels(models: dict, tmp: Path) -> list:
    renamed = wrap_onnx(cnn(tmp / "l.onnx", size=(224, 224), channels=3, stride=4), tmp / "lower.onnx", spec=TORCH_SPEC,
                        labels=("normal", "pneumonia"), head="logits", threshold=0.4).onnx_path
    return [models["keras"], renamed]


def _int8_alone(models: dict, tmp: Path) -> list:
    return [models["keras"], models["torch"] / "resnet_like.int8.onnx"]


REFUSALS = [
    ("labels-by-name", _mismatched_labels, [], "labels normal,pneumonia (binary) differ"),
    ("weights-count", lambda m, t: [m["keras"], m["torch"]], ["--weights", "1,2,3"], "3 values for 2 inputs"),
    ("weights-negative", lambda m, t: [m["keras"], m["torch"]], ["--weights", "1,-2"], "weights must be positive"),
    ("int8-file-alone", _int8_alone, [], "an int8 file cannot be an input on its own"),
    ("not-a-model", lambda m, t: [m["keras"], m["images"][0]], [], "not a bundle folder or an .onnx file"),
    ("needs-validation", lambda m, t: [m["keras"], m["torch"]], ["--threshold", "youden"], "give --validation"),
]


@pytest.mark.parametrize("make, extra, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_exit_2(models: dict, tmp_path: Path, make, extra: list, message: str) -> None:
    result = invoke(["bundle", "create", tmp_path / "new", *make(models, tmp_path), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert not (tmp_path / "new").exists()


def test_an_existing_output_folder_is_never_overwritten(models: dict, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    script = Path(sys.executable).with_name("pneumoedge")
    done = subprocess.run([str(script), "bundle", "create", str(out), str(models["keras"]), str(models["torch"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
