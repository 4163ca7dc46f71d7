"""Training side: the training data loader equals the runtime's preprocess bit for bit, patient-level
splits and run folders (the metrics and the threshold grammar are tested with the validation room)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoedge.export.errors import TrainingError
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from tests.export_helpers import export_base, phantom_root, tiny_run  # noqa: F401 (fixture)


# --- fast: no TensorFlow -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(height=64, width=64, color="gray", resize="area"),
        PreprocessSpec(height=50, width=70, color="rgb", resize="bilinear", scale=1 / 127.5, offset=-1.0),
        PreprocessSpec(height=48, width=48, color="rgb", resize="nearest_exact", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        PreprocessSpec(height=16, width=16, color="gray", resize="area", decode_reduction=4),
        PreprocessSpec(height=20, width=20, color="rgb", resize="bilinear", decode_reduction=2),
    ],
    ids=["gray-area", "rgb-bilinear-offset", "rgb-nearest-meanstd", "gray-area-jpeg-quarter", "rgb-bilinear-jpeg-half"],
)
def test_training_tensors_equal_runtime_tensors_bit_for_bit(export_base: Path, spec: PreprocessSpec) -> None:
    from pneumoedge.datasets import kaggle
    from pneumoedge.export.training import load_arrays

    samples = kaggle.scan(phantom_root(export_base), split="train")
    assert any(s.path.suffix == ".png" for s in samples), "the data set must include 16-bit PNGs"
    assert any(s.path.suffix == ".jpeg" for s in samples)
    x, y = load_arrays(samples, spec, "binary", kaggle.BINARY_LABELS)
    assert x.dtype == np.float32 and x.shape == (len(samples), *spec.input_shape)
    for i, sample in enumerate(samples):
        expected = preprocess(sample.path, spec)
        assert expected.dtype == x.dtype
        assert np.array_equal(x[i], expected), sample.path  # bit for bit, not approximately
        assert kaggle.BINARY_LABELS[y[i]] == sample.label


def test_decode_reduction_reduces_jpeg_only(export_base: Path) -> None:
    """decode_reduction=4 really decodes JPEGs at 1/4 (96 px phantoms -> 24 px); PNGs stay full size."""
    from pneumoedge.datasets import kaggle
    from pneumoedge.preprocessing import read_for

    spec = PreprocessSpec(height=16, width=16, decode_reduction=4)
    samples = kaggle.scan(phantom_root(export_base), split="train")
    shapes = {s.path.suffix: read_for(s.path, spec).shape for s in samples}
    assert shapes[".jpeg"] == (24, 24) and shapes[".png"] == (96, 96)


def test_bad_decode_reduction_is_a_training_error() -> None:
    from pneumoedge.export.training import with_decode_reduction

    assert with_decode_reduction(PreprocessSpec(), 4).decode_reduction == 4
    with pytest.raises(TrainingError, match="decode_reduction"):
        with_decode_reduction(PreprocessSpec(), 3)


def test_foreign_export_refuses_decode_reduction(tmp_path: Path) -> None:
    """A reduced decode moves a foreign model's probabilities: only pneumoedge-trained runs may use it."""
    from pneumoedge.export.errors import ExportError
    from pneumoedge.export.foreign import export_foreign

    with pytest.raises(ExportError, match="decode_reduction=4"):
        export_foreign(tmp_path / "any.keras", tmp_path / "out.onnx", spec=PreprocessSpec(decode_reduction=4), labels=["NORMAL", "PNEUMONIA"], head="sigmoid")


def test_unknown_architecture_lists_the_choices() -> None:
    from pneumoedge.export.architectures import ARCHITECTURES, get_architecture

    with pytest.raises(TrainingError, match="cnn3_gray150"):
        get_architecture("resnet9000")
    assert {"cnn3_gray150", "cnn4_gray256", "cnn4_rgb224"} <= set(ARCHITECTURES)


# --- slow: TensorFlow ---------------------------------------------------------------------


@pytest.mark.slow
def test_architectures_build_binary_and_multiclass_small() -> None:
    pytest.importorskip("tensorflow")
    from pneumoedge.export.architectures import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        binary = arch.build("binary", size=(64, 64))
        multi = arch.build("multiclass", num_classes=3, size=(64, 64))
        assert binary.output_shape == (None, 1) and multi.output_shape == (None, 3)
        assert binary.input_shape == (None, 64, 64, arch.spec.channels)
        assert arch.build("binary").count_params() < 300_000  # small enough for a few-MB bundle


@pytest.mark.slow
def test_training_run_folder_and_patient_level_split(export_base: Path) -> None:
    pytest.importorskip("tensorflow")
    result = tiny_run(export_base)
    run = result.run_dir
    for name in ("model.keras", "spec.json", "run.json", "split.json", "history.json", "metrics.json", "labels.json"):
        assert (run / name).is_file(), name
    assert (run / "plots" / "training_curves.png").is_file() and (run / "plots" / "validation_roc.png").is_file()
    spec = PreprocessSpec.from_dict(json.loads((run / "spec.json").read_text()))
    assert (spec.height, spec.width) == (64, 64)
    split = json.loads((run / "split.json").read_text())
    train_patients = {e["patient"] for e in split["train"]}
    val_patients = {e["patient"] for e in split["val"]}
    assert train_patients and val_patients and not train_patients & val_patients
    record = json.loads((run / "run.json").read_text())
    assert record["provenance"]["synthetic"] is True  # the phantom generator's PROVENANCE file was found
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["threshold"]["threshold"] <= 1.0 and metrics["threshold"]["sensitivity"] >= 0.95
    assert "test" in metrics and metrics["test"]["images"] > 0
    with pytest.raises(TrainingError, match="already holds"):
        from pneumoedge.export.training import TrainingOptions, train

        train(phantom_root(export_base), "cnn3_gray150", run, TrainingOptions(epochs=1))


@pytest.mark.slow
def test_reduced_decode_run_trains_exports_and_runs_on_the_same_tensors(export_base: Path, tmp_path: Path) -> None:
    """`train(decode_reduction=4)`: the spec travels to the bundle, and the runtime's tensors for
    JPEG and 16-bit PNG files equal the training loader's bit for bit."""
    pytest.importorskip("tensorflow")
    import pneumoedge
    from pneumoedge.bundle import read_manifest
    from pneumoedge.datasets import kaggle
    from pneumoedge.export.pipeline import export_runs
    from pneumoedge.export.training import TrainingOptions, load_arrays, train

    data = phantom_root(export_base)
    result = train(data, "cnn3_gray150", tmp_path / "run", TrainingOptions(epochs=1, size=(16, 16), batch_size=32, seed=2, patience=1, decode_reduction=4))
    assert result.spec.decode_reduction == 4
    assert json.loads((result.run_dir / "spec.json").read_text())["decode_reduction"] == 4
    assert json.loads((result.run_dir / "run.json").read_text())["options"]["decode_reduction"] == 4
    bundle = export_runs([result.run_dir], tmp_path / "bundle")
    assert all(m.card.spec.decode_reduction == 4 for m in read_manifest(bundle.bundle_dir).members)
    samples = kaggle.scan(data, split="test")
    assert {s.path.suffix for s in samples} == {".jpeg", ".png"}
    x, _ = load_arrays(samples, result.spec, "binary", kaggle.BINARY_LABELS)
    ensemble = pneumoedge.load(bundle.bundle_dir)
    for i, sample in enumerate(samples):
        (tensor,) = ensemble.tensors(ensemble.decode(sample.path))
        assert np.array_equal(tensor, x[i]), sample.path


@pytest.mark.slow
def test_cli_foreign_export_keeps_full_decode(export_base: Path, tmp_path: Path) -> None:
    """`pneumoedge export model.keras --size ...` (a model pneumoedge did not train) writes decode_reduction=1."""
    pytest.importorskip("tensorflow")
    from typer.testing import CliRunner

    from pneumoedge.bundle import read_manifest
    from pneumoedge.cli import app

    model = tiny_run(export_base).run_dir / "model.keras"
    out = tmp_path / "foreign"
    result = CliRunner().invoke(app, ["export", str(model), "--out", str(out), "--size", "64", "64", "--labels", "NORMAL,PNEUMONIA",
                                      "--images", str(phantom_root(export_base) / "test" / "NORMAL")])
    assert result.exit_code == 0, result.output
    (member,) = read_manifest(out).members
    assert member.card.spec.decode_reduction == 1
