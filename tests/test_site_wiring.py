"""`--site` in infer, serve, listen, evaluate and `pneumoedge.load(site=)`: the site's threshold decides, another bundle's is refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import pytest
import typer
from typer.testing import CliRunner

import pneumoedge
from pneumoedge.commands import evaluate as evaluate_verb
from pneumoedge.commands import infer as infer_verb
from pneumoedge.commands import listen as listen_verb
from pneumoedge.commands import serve as serve_verb
from pneumoedge.site import SiteError, SiteThreshold, bundle_sha256, write_site
from tests.conftest import gradient_image
from tests.serve_helpers import free_port


def _app(*modules) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    for module in modules:
        module.register(app)

    @app.callback()
    def _main() -> None:
        pass

    return app


def _site(bundle: Path, path: Path, threshold: float) -> Path:
    return write_site(path, SiteThreshold(threshold=threshold, method=f"fixed:{threshold}", description=f"fixed {threshold} (test)",
                                          bundle_name="test-bundle", bundle_sha256=bundle_sha256(bundle)))


@pytest.fixture
def other_bundle(bundle_dir: Path, tmp_path: Path) -> Path:
    other = tmp_path / "other"
    shutil.copytree(bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "another"
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


def test_load_with_site_and_refusals(bundle_dir: Path, other_bundle: Path, gray_model: Path, tmp_path: Path) -> None:
    site = _site(bundle_dir, tmp_path / "site.json", 0.55)
    model = pneumoedge.load(bundle_dir, threads=1, site=site)
    assert model.threshold == 0.55 and "site file" in model.threshold_method and model.describe()["threshold"] == 0.55
    with pytest.raises(SiteError, match="was chosen for bundle"):
        pneumoedge.load(other_bundle, site=site)
    with pytest.raises(SiteError, match="bundle folder"):
        pneumoedge.load(gray_model, site=site)


def test_infer_with_site_labels_by_the_site_threshold(bundle_dir: Path, other_bundle: Path, image_folder: Path, tmp_path: Path) -> None:
    ps = sorted(p.probabilities["PNEUMONIA"] for p in pneumoedge.load(bundle_dir, threads=1).predict_many(sorted(image_folder.rglob("*.*"))))
    # a threshold midway between two images' probabilities (no ties), the one that relabels most images against the bundle's 0.4
    middles = [round((a + b) / 2, 6) for a, b in zip(ps, ps[1:]) if b - a > 1e-5]
    threshold = max(middles, key=lambda t: abs(sum(p >= t for p in ps) - sum(p >= 0.4 for p in ps)))
    site = _site(bundle_dir, tmp_path / "site.json", threshold)
    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(_app(infer_verb), ["infer", str(image_folder), "--model", str(bundle_dir), "--site", str(site),
                                                   "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "site file" in result.output
    with open(out, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["status"] == "ok"]
    assert rows and all(float(row["threshold"]) == threshold for row in rows)
    relabelled = 0
    for row in rows:
        p = float(row["p_PNEUMONIA"])
        assert row["label"] == ("PNEUMONIA" if p >= threshold else "NORMAL")
        relabelled += (p >= threshold) != (p >= 0.4)
    assert relabelled > 0
    refused = CliRunner().invoke(_app(infer_verb), ["infer", str(image_folder), "--model", str(other_bundle), "--site", str(site)])
    assert refused.exit_code == 2 and "was chosen for bundle" in refused.output and "Traceback" not in refused.output


def test_serve_and_listen_take_site_and_refuse_another_bundles(bundle_dir: Path, other_bundle: Path, tmp_path: Path) -> None:
    site = _site(bundle_dir, tmp_path / "site.json", 0.6)
    for verb, module, args in (("serve", serve_verb, ["--port", "0"]), ("listen", listen_verb, ["--out", str(tmp_path / "node"), "--check"])):
        assert "--site" in CliRunner().invoke(_app(module), [verb, "--help"]).output
        refused = CliRunner().invoke(_app(module), [verb, "--model", str(other_bundle), "--site", str(site), *args])
        assert refused.exit_code == 2 and "was chosen for bundle" in refused.output, (verb, refused.output)
    checked = CliRunner().invoke(_app(listen_verb), ["listen", "--model", str(bundle_dir), "--site", str(site), "--out", str(tmp_path / "node"),
                                                     "--check", "--port", str(free_port())])
    assert checked.exit_code == 0 and "model loaded" in checked.output, checked.output


def test_serve_answers_with_the_site_threshold(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pneumoedge.serve import ServeSettings, create_app

    site = _site(bundle_dir, tmp_path / "site.json", 0.6)
    app = create_app(pneumoedge.load(bundle_dir, threads=1, site=site), ServeSettings())
    with TestClient(app, base_url="http://localhost") as client:
        model = client.get("/api/v1/model").json()
        image = sorted(image_folder.glob("*.png"))[0]
        rows = client.post("/api/v1/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()["results"]
    assert model["threshold"] == 0.6 and "site file" in model["threshold_method"]
    assert rows[0]["threshold"] == 0.6


def test_evaluate_on_a_bundle_is_validate(bundle_dir: Path, tmp_path: Path) -> None:
    for k, label in enumerate(("NORMAL", "PNEUMONIA")):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "data" / label / f"{i}.png"), gradient_image(40, 48, 10 * k + i))
    result = CliRunner().invoke(_app(evaluate_verb), ["evaluate", str(bundle_dir), str(tmp_path / "data"), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n"] == 6 and report["format"] == "pneumoedge-validation"
