"""`pneumoedge validate` end to end on phantoms: numbers equal infer's rows, honest counts, site.json, no matplotlib."""

from __future__ import annotations

import csv
import html
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pneumoedge.bundle import BundleError, MemberSource, read_manifest, sha256_file, write_bundle
from pneumoedge.commands import infer as infer_verb
from pneumoedge.commands import validate as validate_verb
from pneumoedge.datasets.phantoms import generate_dataset
from pneumoedge.runtime.loading import default_bundle_path, load
from pneumoedge.site import SiteError, apply_site, bundle_sha256, read_site
from pneumoedge.validation import metrics
from pneumoedge.validation.data import DataError
from pneumoedge.validation.plots import INSTALL_HINT
from pneumoedge.validation.report import validate
from tests.conftest import SPEC_GRAY, gradient_image
from tests.onnx_models import mean_model

CONTRACT = ("sensitivity", "specificity", "roc_auc", "threshold", "ood", "calibration", "thresholds", "n", "per_label", "bundle", "created")


def _app(*modules) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    for module in modules:
        module.register(app)

    @app.callback()
    def _main() -> None:  # a group, so the verb is named on the command line
        pass

    return app


@pytest.fixture(scope="module")
def phantom_split(tmp_path_factory) -> Path:
    """A small labelled split (6 NORMAL, 6 PNEUMONIA phantoms) plus a truncated JPEG and a text file."""
    root = generate_dataset(tmp_path_factory.mktemp("validate") / "ph", counts={"test": {"normal": 6, "bacteria": 3, "virus": 3}},
                            size=(160, 160), seed=21)
    split = root / "test"
    first = sorted((split / "PNEUMONIA").glob("*.jpeg"))[0]
    (split / "PNEUMONIA" / "truncated.jpeg").write_bytes(first.read_bytes()[:400])
    (split / "NORMAL" / "notes.txt").write_text("not an image\n")
    return split


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """The default bundle, copied (site files must never touch the shipped one)."""
    target = tmp_path_factory.mktemp("bundle") / "default"
    shutil.copytree(default_bundle_path(), target)
    return target


def _infer_rows(bundle: Path, data: Path, tmp_path: Path, *extra: str) -> dict[str, dict[str, str]]:
    out = tmp_path / "infer.csv"
    result = CliRunner().invoke(_app(infer_verb), ["infer", str(data), "--model", str(bundle), "--out", str(out), *extra])
    assert result.exit_code in (0, 1), result.output
    with open(out, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_report_numbers_are_infers_rows(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    result = validate(bundle_copy, phantom_split, tmp_path / "report", threads=1)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all(key in report for key in CONTRACT)
    for key in ("sensitivity", "specificity", "roc_auc"):
        assert set(report[key]) == {"value", "ci_low", "ci_high"}
    rows = _infer_rows(bundle_copy, phantom_split, tmp_path, "--threads", "1")
    ok = {path: row for path, row in rows.items() if row["status"] == "ok"}
    truth = {path: Path(path).parent.name for path in ok}
    # counts: every file accounted for, the unreadable one counted, the text file skipped
    assert report["n"] == len(ok) == 12
    assert report["data"]["unreadable"] == 1 and report["unreadable"][0]["path"].endswith("truncated.jpeg")
    assert report["data"]["skipped"] == 1 and report["per_label"] == {"NORMAL": 6, "PNEUMONIA": 6}
    # sensitivity/specificity from infer's labels, with the Wilson interval written out by hand
    tp = sum(truth[p] == "PNEUMONIA" and r["label"] == "PNEUMONIA" for p, r in ok.items())
    tn = sum(truth[p] == "NORMAL" and r["label"] == "NORMAL" for p, r in ok.items())
    assert report["sensitivity"]["value"] == tp / 6 and report["specificity"]["value"] == tn / 6
    z = 1.959963984540054
    s = tp / 6
    centre, half = (s + z * z / 12) / (1 + z * z / 6), z * np.sqrt(s * (1 - s) / 6 + z * z / 144) / (1 + z * z / 6)
    assert report["sensitivity"]["ci_low"] == pytest.approx(max(0.0, centre - half), abs=1e-9)
    # ROC AUC: Mann-Whitney by brute force on infer's probabilities
    pos = np.array([float(r["p_PNEUMONIA"]) for p, r in ok.items() if truth[p] == "PNEUMONIA"])
    neg = np.array([float(r["p_PNEUMONIA"]) for p, r in ok.items() if truth[p] == "NORMAL"])
    brute = float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())
    assert report["roc_auc"]["value"] == pytest.approx(brute, abs=1e-6)
    # out of distribution: the same flags as infer's ood column
    assert report["ood"]["flagged"] == sum(r["ood"] == "true" for r in ok.values())
    assert report["threshold"] == pytest.approx(float(next(iter(ok.values()))["threshold"]), abs=1e-6)
    # predictions.csv is infer's rows, row for row (same columns, same numbers)
    with open(tmp_path / "report" / "predictions.csv", newline="") as handle:
        mine = {row["path"]: row for row in csv.DictReader(handle)}
    assert set(mine) == set(rows)
    for path, row in rows.items():
        assert {k: v for k, v in mine[path].items() if k != "provider"} == {k: v for k, v in row.items() if k != "provider"}
    # the listing's checksum is the one of listing.tsv's lines, and the page is self-contained
    assert result.report["data"]["listing_sha256"] == report["data"]["listing_sha256"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "never a diagnosis" in page and "http://" not in page and "https://" not in page
    assert report["bundle"]["sha256"] == bundle_sha256(bundle_copy)


def test_site_threshold_changes_labels_exactly_and_leaves_the_bundle(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in bundle_copy.iterdir()}
    result = CliRunner().invoke(_app(validate_verb), ["validate", str(bundle_copy), str(phantom_split), "--out", str(tmp_path / "r"),
                                                      "--site-threshold", "fixed:0.9", "--threads", "1", "--gallery", "2"])
    assert result.exit_code == 1, result.output  # the report is written; one file could not be read
    site = read_site(tmp_path / "r" / "site.json")
    assert site.threshold == 0.9 and site.bundle_sha256 == bundle_sha256(bundle_copy)
    ensemble = load(bundle_copy, threads=1)
    plain = {p.source: p for p in ensemble.predict_many(sorted(phantom_split.glob("*/*.jpeg")))}
    apply_site(ensemble, tmp_path / "r" / "site.json")
    sited = {p.source: p for p in ensemble.predict_many(sorted(phantom_split.glob("*/*.jpeg")))}
    flipped = 0
    for source, prediction in sited.items():
        if prediction.status != "ok":
            continue
        p = prediction.probabilities["PNEUMONIA"]
        assert prediction.label == ("PNEUMONIA" if p >= 0.9 else "NORMAL") and prediction.threshold == 0.9
        assert p == plain[source].probabilities["PNEUMONIA"]
        flipped += prediction.label != plain[source].label
    assert flipped > 0  # the threshold is far enough from the bundle's to matter here
    assert {p.name: p.read_bytes() for p in bundle_copy.iterdir()} == before
    read_manifest(bundle_copy, verify=True)
    # validating with the site file: its threshold, its false negatives first in the gallery, with heatmaps
    again = validate(bundle_copy, phantom_split, tmp_path / "again", threads=1, site=tmp_path / "r" / "site.json", gallery=3)
    assert again.report["threshold"] == 0.9 and "site file" in again.report["threshold_source"]
    shown = again.report["gallery"]["shown"]
    assert shown and shown[0]["kind"] == "false negative" and (tmp_path / "again" / shown[0]["overlay"]).is_file()
    # overwritten without a site threshold: the earlier site.json and heatmaps do not linger beside the new report
    validate(bundle_copy, phantom_split, tmp_path / "r", threads=1, overwrite=True, gallery=0)
    assert not (tmp_path / "r" / "site.json").exists() and not list((tmp_path / "r").glob("gallery/*.png"))


def test_site_file_of_another_bundle_is_refused(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    validate(bundle_copy, phantom_split, tmp_path / "r", threads=1, site_threshold="youden")
    other = tmp_path / "other"
    shutil.copytree(bundle_copy, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "another-bundle"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SiteError, match="validate this bundle"):
        apply_site(load(other, threads=1), tmp_path / "r" / "site.json")
    result = CliRunner().invoke(_app(validate_verb), ["validate", str(other), str(phantom_split), "--out", str(tmp_path / "x"),
                                                      "--site", str(tmp_path / "r" / "site.json")])
    assert result.exit_code == 2 and "was chosen for bundle" in result.output


def test_report_without_matplotlib_keeps_every_number(phantom_split: Path, bundle_copy: Path, tmp_path: Path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = validate(bundle_copy, phantom_split, tmp_path / "r", threads=1, prevalence=0.2)
    page = (tmp_path / "r" / "report.html").read_text()
    assert result.report["plots"] == {} and html.escape(INSTALL_HINT) in page and "data:image/png" not in page.split("Worst errors")[0]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["sensitivity"]["value"] is not None and report["subsets"]["all"]["predictive_values"][1]["prevalence"] == 0.2


def test_csv_listing_counts_missing_files_and_refuses_unknown_labels(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    images = sorted(phantom_split.glob("NORMAL/*.jpeg"))[:3] + [phantom_split / "PNEUMONIA" / "truncated.jpeg"]
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name.lower()}\n" for p in images) + "gone.jpeg,PNEUMONIA\n")
    report = validate(bundle_copy, listing, tmp_path / "r", threads=1).report
    assert report["n"] == 3 and report["data"]["unreadable"] == 2 and report["data"]["label_source"] == "CSV file labels.csv"
    assert any(u["path"].endswith("gone.jpeg") and "not found" in u["reason"] for u in report["unreadable"])
    listing.write_text(f"{images[0]},COVID\n")
    with pytest.raises(DataError, match="COVID"):
        validate(bundle_copy, listing, tmp_path / "r2", threads=1)


@pytest.mark.parametrize(
    "args, message",
    [(["--prevalence", "1.5"], "prevalence"), (["--site-threshold", "spec:0.9"], "fixed:X"), (["--width", "0"], "width")],
)
def test_user_mistakes_are_one_line_errors(args, message, phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(validate_verb), ["validate", str(bundle_copy), str(phantom_split), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_unknown_label_folder_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "data" / "NORMAL").mkdir(parents=True)
    (tmp_path / "data" / "COVID").mkdir()
    with pytest.raises(DataError, match="COVID"):
        validate(bundle_copy, tmp_path / "data", tmp_path / "r")


def test_multiclass_bundle_gets_per_class_numbers(tmp_path: Path) -> None:
    labels = ("NORMAL", "BACTERIA", "VIRUS")
    model = mean_model(tmp_path / "m.onnx", SPEC_GRAY, a=(-6.0, 0.0, 6.0), b=(3.0, 0.0, -3.0), head="softmax", labels=labels, task="multiclass")
    write_bundle(tmp_path / "bundle", [MemberSource(model, "m", SPEC_GRAY)], labels=labels, task="multiclass", threshold=None,
                 threshold_method="argmax", name="three")
    for k, label in enumerate(labels):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            image = np.clip(gradient_image(40, 40, 10 * k + i).astype(np.float32) * 0.3 + 90 * k, 0, 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "data" / label / f"{i}.png"), image)
    report = validate(tmp_path / "bundle", tmp_path / "data", tmp_path / "r", threads=1).report
    per_class = report["subsets"]["all"]["per_class"]
    assert set(per_class) == set(labels) and report["threshold"] is None and report["sensitivity"]["value"] is None
    matrix = np.array(report["subsets"]["all"]["confusion_matrix"])
    for k, label in enumerate(labels):
        assert per_class[label]["sensitivity"]["value"] == matrix[k, k] / matrix[k].sum()
    assert report["subsets"]["all"]["accuracy"]["value"] == pytest.approx(np.trace(matrix) / 12)
    assert (tmp_path / "r" / "report.html").is_file()
    assert metrics.roc_auc(np.repeat([0, 1, 2], 4) == 2, [0] * 12) == 0.5  # sanity of the OvR helper on ties


def test_kaggle_root_means_its_test_split(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    report = validate(bundle_copy, phantom_split.parent, tmp_path / "r", threads=1, gallery=0).report
    assert report["n"] == 12 and report["data"]["labelled_folder"] == str(phantom_split)


def test_a_bare_onnx_file_is_validated_but_takes_no_site_threshold(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    member = bundle_copy / "cnn3_gray150.fp32.onnx"
    report = validate(member, phantom_split, tmp_path / "r", threads=1, gallery=0).report
    assert report["n"] == 12 and report["bundle"]["sha256"] == sha256_file(member) and report["threshold_source"].startswith("model: ")
    with pytest.raises(BundleError, match="belongs to a bundle folder"):
        validate(member, phantom_split, tmp_path / "r2", site_threshold="youden")


_CLINIC = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    # the clinic install: no TensorFlow, no Keras, no tf2onnx, no matplotlib
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "matplotlib"):
            raise ImportError(f"{name} is not installed in the clinic install")
sys.meta_path.insert(0, Absent())
from pneumoedge.cli import app
sys.argv = ["pneumoedge", "validate", *sys.argv[1:]]
app()
"""


def test_runs_as_in_the_clinic_install_without_tensorflow_or_matplotlib(phantom_split: Path, bundle_copy: Path, tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "r"
    done = subprocess.run([sys.executable, "-c", _CLINIC, str(bundle_copy), str(phantom_split), "--out", str(out), "--threads", "1",
                           "--site-threshold", "sensitivity:0.9"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # written; the truncated JPEG is counted as unreadable
    assert "Traceback" not in done.stderr and "pneumoedge[report]" in done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 12 and report["plots"] == [] and (out / "site.json").is_file()
