"""`pneumoedge infer` and `info` driven in-process over tables of cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from pneumoedge.cli import app

runner = CliRunner()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_folder_with_bad_files_accounts_for_every_file(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "truncated.jpeg").write_bytes((image_folder / "a.jpeg").read_bytes()[:10])
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "notes.txt").write_text("not an image")
    out = tmp_path / "results.csv"
    result = runner.invoke(app, ["infer", str(image_folder), "--model", str(bundle_dir), "--out", str(out)])
    assert result.exit_code == 1, result.output
    rows = _rows(out)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == sorted(["a.jpeg", "b.png", "c.png", "d.jpg", "e.bmp", "f.PNG", "truncated.jpeg", "empty.png", "notes.txt"])
    assert {n for n, r in by_name.items() if r["status"] == "ok"} == {"a.jpeg", "b.png", "c.png", "d.jpg", "e.bmp", "f.PNG"}
    assert by_name["empty.png"]["status"] == "error" and "empty" in by_name["empty.png"]["error"]
    assert by_name["truncated.jpeg"]["status"] == "error" and by_name["truncated.jpeg"]["error"]
    assert by_name["notes.txt"]["status"] == "skipped" and "not an image" in by_name["notes.txt"]["error"]
    ok = by_name["a.jpeg"]
    assert ok["label"] in ("NORMAL", "PNEUMONIA")
    assert float(ok["p_NORMAL"]) + float(ok["p_PNEUMONIA"]) == pytest.approx(1.0, abs=1e-5)
    assert ok["member.gray.p_PNEUMONIA"] and ok["member.rgb.p_PNEUMONIA"]
    assert float(ok["threshold"]) == 0.4 and ok["provider"] == "CPUExecutionProvider"
    assert "never a diagnosis" in result.output
    assert "error" in result.output and "empty.png: empty file" in result.output


def test_rows_match_python_api(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    import pneumoedge

    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out), "--batch", "4"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    model = pneumoedge.load(bundle_dir)
    for record in records:
        assert record["probabilities"]["PNEUMONIA"] == pytest.approx(model.predict(record["path"]).probabilities["PNEUMONIA"], abs=1e-6)
        assert set(record["member_probabilities"]) == {"gray", "rgb"}


def test_csv_to_stdout_when_no_out(bundle_dir: Path, image_folder: Path) -> None:
    result = runner.invoke(app, ["infer", str(image_folder / "a.jpeg"), "-m", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    assert "path,status,label,probability,p_NORMAL,p_PNEUMONIA" in result.stdout


def test_adhoc_ensemble_of_onnx_files(gray_model: Path, rgb_model: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(gray_model), "-m", str(rgb_model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["threshold"] == "0.500000"


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--device", "tpu"], 2, "device must be one of"),
        (["--precision", "int8"], 2, "has no int8 members"),
        (["--format", "xml", "-o", "OUT"], 2, "--format must be one of"),
        (["--resume"], 2, "--resume needs --out"),
    ],
)
def test_usage_errors_exit_2_without_traceback(bundle_dir: Path, image_folder: Path, tmp_path: Path, extra, code, message) -> None:
    extra = [str(tmp_path / "o.csv") if e == "OUT" else e for e in extra]
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), *extra])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_input_and_missing_model(bundle_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["infer", str(tmp_path / "nope"), "-m", str(bundle_dir)])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    result = runner.invoke(app, ["infer", str(tmp_path), "-m", str(tmp_path / "model.onnx")])
    assert result.exit_code == 2 and "no such model file" in result.output


def test_cuda_without_cuda_exits_2_with_install_hint(bundle_dir: Path, image_folder: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDAExecutionProvider" in result.output and "onnxruntime-gpu" in result.output


def test_folder_without_images_exits_3(bundle_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["infer", str(tmp_path / "empty"), "-m", str(bundle_dir), "-o", str(tmp_path / "r.csv")])
    assert result.exit_code == 3


def test_existing_output_needs_overwrite(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_text("precious\n")
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_text() == "precious\n"
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0 and len(_rows(out)) == 6


def test_resume_keeps_finished_rows_and_redoes_errors_and_cut_lines(bundle_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    assert runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out)]).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    # Simulate a crash: the first two rows finished, the third cut mid-line, plus an old error row.
    error_row = lines[3].split(",")[0] + ",error,,,,,,,,,,,,transient\n"
    out.write_text(lines[0] + lines[1] + error_row + lines[2] + lines[4][:15])
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in image_folder.rglob("*.*"))
    assert all(r["status"] == "ok" for r in rows)
    assert "kept from earlier run" in result.output


def test_resume_refuses_output_of_another_model(bundle_dir: Path, gray_model: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    runner.invoke(app, ["infer", str(image_folder), "-m", str(gray_model), "-o", str(out)])
    result = runner.invoke(app, ["infer", str(image_folder), "-m", str(bundle_dir), "-o", str(out), "--resume"])
    assert result.exit_code == 2 and "columns differ" in result.output


def test_info_shows_members_and_provenance(bundle_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(bundle_dir), "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert [m["name"] for m in described["members"]] == ["gray", "rgb"]
    assert described["threshold"] == 0.4 and described["provenance"] == {"synthetic": True}
    table = runner.invoke(app, ["info", str(bundle_dir)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "24x40 rgb NHWC" in table.output


def test_info_on_tampered_bundle_fails_clearly(bundle_dir: Path) -> None:
    (bundle_dir / "gray.fp32.onnx").write_bytes(b"swapped")
    result = runner.invoke(app, ["info", str(bundle_dir)])
    assert result.exit_code == 2 and "checksum mismatch" in result.output


def test_a_verb_whose_module_is_missing_fails_loudly(monkeypatch) -> None:
    """A typo in a verb's module name is an error, never a verb that silently vanishes from the CLI."""
    from pneumoedge import cli

    monkeypatch.setitem(cli.VERBS, "frobnicate", "no_such_verb_module")
    cli.verb_command.cache_clear()
    with pytest.raises(ModuleNotFoundError, match="no_such_verb_module"):
        cli.verb_command("frobnicate")
    assert cli.verb_command("info").name == "info"
