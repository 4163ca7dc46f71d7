"""Tests for pneumoedge.datasets: Kaggle layout parsing, splits, weights, and synthetic phantoms."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumoedge.datasets import (
    BINARY_LABELS,
    MULTICLASS_LABELS,
    DatasetError,
    Sample,
    balanced_resample,
    class_weights,
    generate_dataset,
    is_synthetic,
    labels_for,
    patient_id,
    patient_split,
    render_phantom,
    scan,
    subtype_of,
    summary,
    write_examples,
)
from pneumoedge.datasets import phantoms
from pneumoedge.datasets.drawing import work_shape
from pneumoedge.imageio import read_pixels

SMALL = {
    "train": {"normal": 12, "bacteria": 8, "virus": 8},
    "val": {"normal": 2, "bacteria": 1, "virus": 1},
    "test": {"normal": 4, "bacteria": 2, "virus": 2},
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("ds") / "chest_xray", counts=SMALL, size=(64, 72), seed=3,
                            sixteen_bit_fraction=0.2, workers=2)


def _sample(name: str, label: str, split: str = "train") -> Sample:
    return Sample(Path(name), label, subtype_of(name, label), patient_id(name), split)


# --- Kaggle names -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, folder, patient, subtype",
    [
        ("IM-0115-0001.jpeg", "NORMAL", "IM-0115", "NORMAL"),
        ("NORMAL2-IM-0588-0001.jpeg", "NORMAL", "NORMAL2-IM-0588", "NORMAL"),
        ("NORMAL2-IM-1427-0001.jpeg", "normal", "NORMAL2-IM-1427", "NORMAL"),
        ("person1_bacteria_1.jpeg", "PNEUMONIA", "person1", "BACTERIAL"),
        ("person1000_virus_1681.jpeg", "PNEUMONIA", "person1000", "VIRAL"),
        ("person1946_bacteria_4874.JPG", "PNEUMONIA", "person1946", "BACTERIAL"),
        ("/data/train/PNEUMONIA/person3_virus_15.png", "PNEUMONIA", "person3", "VIRAL"),
        ("scan_42.jpeg", "PNEUMONIA", "scan_42", "UNKNOWN"),
    ],
)
def test_kaggle_names(name, folder, patient, subtype):
    assert patient_id(name) == patient
    assert subtype_of(name, folder) == subtype


def test_unknown_subtype_is_binary_only():
    sample = _sample("scan_42.jpeg", "PNEUMONIA")
    assert sample.target("binary") == "PNEUMONIA"
    with pytest.raises(DatasetError, match="scan_42.jpeg"):
        sample.target("multiclass")


def test_labels_for():
    assert labels_for("binary") == BINARY_LABELS == ("NORMAL", "PNEUMONIA")
    assert labels_for("multiclass") == MULTICLASS_LABELS == ("NORMAL", "BACTERIAL", "VIRAL")
    with pytest.raises(DatasetError, match="task"):
        labels_for("regression")


# --- scan ---------------------------------------------------------------------------------

def test_scan_generated_tree(tree):
    samples = scan(tree)
    assert len(samples) == sum(sum(c.values()) for c in SMALL.values())
    assert samples == scan(tree)  # deterministic
    assert [s.split for s in samples] == sorted((s.split for s in samples), key=("train", "val", "test").index)
    for split, per_kind in SMALL.items():
        got = Counter(s.subtype for s in samples if s.split == split)
        assert got == {"NORMAL": per_kind["normal"], "BACTERIAL": per_kind["bacteria"], "VIRAL": per_kind["virus"]}
    for s in samples:
        assert s.path.parent.name == s.label and s.path.parent.parent.name == s.split
        assert patient_id(s.path.name) == s.patient
    assert {s.path.suffix for s in samples} == {".jpeg", ".png"}
    assert [s.split for s in scan(tree, "val")] == ["val"] * 4
    # Several images per patient, and no patient in two splits.
    per_patient = Counter(s.patient for s in samples)
    assert max(per_patient.values()) > 1
    splits_of = {}
    for s in samples:
        splits_of.setdefault(s.patient, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_of.values())
    assert is_synthetic(tree)
    assert "NOT FOR CLINICAL USE" in (tree / "PROVENANCE.txt").read_text()


def test_scan_reads_back_pixels(tree):
    samples = scan(tree, "train")
    png = next(s for s in samples if s.path.suffix == ".png")
    jpeg = next(s for s in samples if s.path.suffix == ".jpeg")
    assert read_pixels(png.path).dtype == np.uint16
    assert read_pixels(jpeg.path).shape == (64, 72)


def test_summary(tree):
    info = summary(scan(tree), "binary")
    assert info["images"] == 40
    assert info["labels"] == {"NORMAL": 18, "PNEUMONIA": 22}
    assert info["splits"]["val"]["labels"] == {"NORMAL": 2, "PNEUMONIA": 2}
    assert info["patients"] == sum(v["patients"] for v in info["splits"].values())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "none of the folders"),
        (lambda root: (root / "train" / "NORMAL").mkdir(parents=True), "missing label folder"),
        (lambda root: [(root / "train" / d).mkdir(parents=True) for d in BINARY_LABELS], "no images"),
    ],
)
def test_scan_errors_say_the_layout(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DatasetError, match=message) as info:
        scan(root)
    assert "{train,val,test}/{NORMAL,PNEUMONIA}" in str(info.value)


def test_scan_points_at_nested_kaggle_folder(tmp_path):
    (tmp_path / "chest_xray" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="did you mean"):
        scan(tmp_path)


def test_scan_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match="split"):
        scan(tmp_path, "validation")


def test_scan_reports_non_images(tmp_path, caplog):
    for label in BINARY_LABELS:
        (tmp_path / "test" / label).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "test" / "NORMAL" / "IM-0001-0001.JPEG"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "test" / "PNEUMONIA" / "person1_virus_1.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "test" / "NORMAL" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "test" / "PNEUMONIA" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="pneumoedge.datasets.kaggle"):
        samples = scan(tmp_path)
    assert [s.patient for s in samples] == ["IM-0001", "person1"]
    assert "skipped 2 non-image" in caplog.text and ".DS_Store" in caplog.text and "notes.txt" in caplog.text


# --- splitting and weighting --------------------------------------------------------------

def _synthetic_samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    samples, image = [], 1
    for p in range(60):
        for j in range(int(rng.integers(1, 5))):
            samples.append(_sample(f"IM-{p:04d}-{j + 1:04d}.jpeg", "NORMAL"))
    for p in range(40):
        kind = "bacteria" if p % 2 else "virus"
        for _ in range(int(rng.integers(1, 5))):
            samples.append(_sample(f"person{p}_{kind}_{image}.jpeg", "PNEUMONIA"))
            image += 1
    return samples


def test_patient_split_no_shared_patients_deterministic_stratified():
    samples = _synthetic_samples()
    train, val = patient_split(samples, 0.2, seed=7)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert sorted(train + val, key=str) == sorted(samples, key=str)
    again = patient_split(samples, 0.2, seed=7)
    assert (train, val) == again
    shuffled = [samples[i] for i in np.random.default_rng(1).permutation(len(samples))]
    assert {s.path for s in patient_split(shuffled, 0.2, seed=7)[1]} == {s.path for s in val}
    assert {s.path for s in patient_split(samples, 0.2, seed=8)[1]} != {s.path for s in val}
    assert abs(len(val) / len(samples) - 0.2) < 0.05
    for label in BINARY_LABELS:
        share_all = sum(s.label == label for s in samples) / len(samples)
        share_val = sum(s.label == label for s in val) / len(val)
        assert abs(share_val - share_all) < 0.08


def test_patient_split_rejects_bad_fraction():
    with pytest.raises(DatasetError, match="val_fraction"):
        patient_split(_synthetic_samples(), 1.0, seed=0)


def test_class_weights_by_hand():
    samples = (
        [_sample(f"IM-{i:04d}-0001.jpeg", "NORMAL") for i in range(6)]
        + [_sample(f"person{i}_bacteria_{i}.jpeg", "PNEUMONIA") for i in range(3)]
        + [_sample(f"person{10 + i}_virus_{10 + i}.jpeg", "PNEUMONIA") for i in range(1)]
    )
    # n = 10; binary: 10 / (2 * 6), 10 / (2 * 4); multiclass: 10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1).
    assert class_weights(samples, "binary") == pytest.approx({"NORMAL": 10 / 12, "PNEUMONIA": 10 / 8})
    assert class_weights(samples, "multiclass") == pytest.approx({"NORMAL": 10 / 18, "BACTERIAL": 10 / 9, "VIRAL": 10 / 3})
    with pytest.raises(DatasetError, match="VIRAL"):
        class_weights(samples[:9], "multiclass")


def test_balanced_resample_equal_counts():
    samples = _synthetic_samples()
    for task in ("binary", "multiclass"):
        out = balanced_resample(samples, task, seed=0)
        counts = Counter(s.target(task) for s in out)
        assert len(set(counts.values())) == 1 and set(counts) == set(labels_for(task))
        assert set(out) == set(samples)  # every original kept
        assert out == balanced_resample(samples, task, seed=0)


# --- phantoms -----------------------------------------------------------------------------

def test_phantoms_deterministic_and_seed_dependent():
    for kind in phantoms.KINDS:
        a = render_phantom(np.random.default_rng(5), kind, 96, 80)
        b = render_phantom(np.random.default_rng(5), kind, 96, 80)
        c = render_phantom(np.random.default_rng(6), kind, 96, 80)
        assert a.dtype == np.uint8 and a.shape == (96, 80)
        assert np.array_equal(a, b)
        assert np.abs(a.astype(int) - c.astype(int)).mean() > 2


def test_sixteen_bit_phantom_has_more_than_eight_bits():
    img = render_phantom(np.random.default_rng(0), "virus", 128, 128, sixteen_bit=True)
    assert img.dtype == np.uint16
    assert int(img.max()) - int(img.min()) > 1000 and len(np.unique(img)) > 256
    assert img.max() <= phantoms.SIXTEEN_BIT_MAX


def test_render_phantom_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        render_phantom(np.random.default_rng(0), "covid", 64, 64)


def test_generate_dataset_deterministic_and_refuses_stale(tmp_path):
    counts = {"test": {"normal": 3, "bacteria": 2, "virus": 2}}
    a = generate_dataset(tmp_path / "a", counts=counts, size=((40, 60), (50, 70)), seed=1, workers=3)
    b = generate_dataset(tmp_path / "b", counts=counts, size=((40, 60), (50, 70)), seed=1, workers=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpeg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpeg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert len({read_pixels(a / f).shape for f in files_a}) > 1  # size ranges give varied sizes
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(a, counts=counts, seed=2)


def test_signs_raise_lung_density():
    """Cheap learnability check: signs make the lung fields denser than in normal phantoms."""

    def lung_contrast(kind: str, seed: int) -> float:
        rng = np.random.default_rng(seed)
        anatomy = phantoms._draw_anatomy(rng, kind)
        h, w = work_shape(96, 96)
        img, lungs = phantoms._anatomy_image(anatomy, h, w)
        img = img + phantoms._pathology(anatomy, kind, rng, lungs)
        inside = lungs > 0.9
        return float(img[inside].mean())

    means = {kind: np.mean([lung_contrast(kind, s) for s in range(20)]) for kind in phantoms.KINDS}
    assert means["bacteria"] > means["normal"] + 0.01
    assert means["virus"] > means["normal"] + 0.01


def test_write_examples(tmp_path):
    paths = write_examples(tmp_path / "ex", n=6, size=(96, 96))
    assert [p.name.split(".")[0] for p in paths] == [f"example_{i:02d}" for i in range(1, 7)]
    assert sum(p.suffix == ".png" for p in paths) == 1
    rows = (tmp_path / "ex" / "LABELS.csv").read_text().splitlines()
    assert rows[0] == "file,truth,subtype" and len(rows) == 7
    assert {r.split(",")[1] for r in rows[1:]} == set(BINARY_LABELS)
    assert is_synthetic(tmp_path / "ex")


def test_write_examples_png_size_and_size_range(tmp_path):
    """X-ray-sized JPEGs in the range asked; the one 16-bit PNG at its own (smaller) size."""
    paths = write_examples(tmp_path / "ex", n=4, size=((120, 160), (100, 140)), png_size=(64, 80))
    for path in paths:
        pixels = read_pixels(path)
        if path.suffix == ".png":
            assert pixels.shape == (64, 80) and pixels.dtype == np.uint16
        else:
            assert 120 <= pixels.shape[0] <= 160 and 100 <= pixels.shape[1] <= 140 and pixels.dtype == np.uint8
    assert "png_size=(64, 80)" in (tmp_path / "ex" / "PROVENANCE.txt").read_text()


def test_patient_split_tiny_set_still_has_val():
    samples = [_sample(f"IM-{p:04d}-{j:04d}.jpeg", "NORMAL") for p in range(2) for j in range(1, 4)]
    train, val = patient_split(samples, 0.1, seed=0)
    assert train and val and not {s.patient for s in train} & {s.patient for s in val}


def test_generate_dataset_int_size(tmp_path):
    root = generate_dataset(tmp_path / "d", counts={"train": {"virus": 1}}, size=48, seed=0)
    (path,) = (root / "train" / "PNEUMONIA").iterdir()
    assert read_pixels(path).shape == (48, 48) and path.name == "person1_virus_1.jpeg"
