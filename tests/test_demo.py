"""The CLI verbs of the training side, in-process: the quick demo end to end, and user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumoedge.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "/no/such/folder", "--arch", "cnn3_gray150", "--out", "{tmp}/r"], "does not exist"),
        (["train", "{tmp}", "--arch", "resnet9000", "--out", "{tmp}/r"], "unknown architecture"),
        (["evaluate", "{tmp}/nothing", "{tmp}"], ""),
        (["export", "{tmp}/their.keras", "--out", "{tmp}/b"], "--size"),
        (["export", "{tmp}/their.keras", "--out", "{tmp}/b", "--size", "64", "64", "--dicom-voi", "auto"], "dicom_voi must be one of"),
    ],
    ids=["train-missing-data", "train-unknown-arch", "evaluate-missing-model", "export-foreign-without-spec", "export-bad-dicom-voi"],
)
def test_user_mistakes_exit_2_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    pytest.importorskip("tensorflow")
    (tmp_path / "their.keras").write_bytes(b"not really")
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert message in result.output.replace("\n", " ")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    precisions = {m["precision"] for m in manifest["members"]}
    # Two epochs on a few phantoms make near-chance models whose int8 may miss the tolerance:
    # then no int8 file is written and the provenance says why; otherwise it is evaluated too.
    assert "fp32" in precisions and precisions <= {"fp32", "int8"}
    if "int8" not in precisions:
        assert "runs fp32" in manifest["provenance"]["int8_withheld"] and "int8 not written" in result.output
    else:
        assert manifest["default_precision"] == "int8"
    assert len({m["name"] for m in manifest["members"]}) == 2
    assert manifest["provenance"]["synthetic"] is True
    report = json.loads((out / "demo_report.json").read_text())
    assert len(report["predictions"]) == 4 and all(p["status"] == "ok" for p in report["predictions"])
    for precision in precisions:
        assert (out / "evaluation" / f"bundle_{precision}" / "evaluation_roc.png").is_file()
    assert (out / "evaluation" / "bundle_int8").exists() == ("int8" in precisions)
    for word in ("time per step", "bundle", "examples", "NOT clinically validated", "never a diagnosis"):
        assert word in result.output
