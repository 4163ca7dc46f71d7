"""Per-machine configuration: CPU flags, the untuned rule, `tune` and its cache, and what users see."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import pneumoedge
from pneumoedge.bundle import MemberSource, read_manifest, write_bundle
from pneumoedge.cli import app
from pneumoedge.benchmarking.tune import choose
from pneumoedge.benchmarking.tune import tune as tune_bundle
from pneumoedge.runtime import machine, tuning
from pneumoedge.runtime.machine import CpuInfo, cache_dir, parse_cpuinfo
from tests.conftest import SPEC_GRAY, gradient_image
from tests.onnx_models import mean_model

runner = CliRunner()
VNNI = CpuInfo("Xeon with VNNI", ("avx2", "avx512f", "avx512_vnni"), 4)
AVX2 = CpuInfo("EPYC without VNNI", ("avx2",), 2)
PASSED = {"members": {"m": {"int8": {"meets_tolerance": True}}}, "metrics": {"int8_vs_fp32": {"max_prob_diff": 0.01, "agreement": 1.0}}}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch) -> Path:
    """Every test gets an empty cache folder of its own (never the user's)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PNEUMOEDGE_CACHE_DIR", str(folder))
    return folder


def two_precision_bundle(root: Path, *, provenance=PASSED, default: str = "fp32") -> Path:
    """fp32 and int8 members of one model (different files, so each precision is its own member)."""
    fp32 = mean_model(root / "m32.onnx", SPEC_GRAY, a=(4.0,))
    int8 = mean_model(root / "m8.onnx", SPEC_GRAY, a=(4.1,))
    write_bundle(
        root / "bundle",
        [MemberSource(fp32, "m", SPEC_GRAY, "fp32"), MemberSource(int8, "m", SPEC_GRAY, "int8")],
        labels=("NORMAL", "PNEUMONIA"), threshold=0.5, provenance=provenance, default_precision=default,
    )
    return root / "bundle"


def use_cpu(monkeypatch, cpu: CpuInfo) -> None:
    monkeypatch.setattr(tuning, "cpu_info", lambda: cpu)


# -- the machine ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, flags, fast",
    [
        ("model name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8\n", ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"), True),
        ("model name\t: Intel Core\nflags\t\t: fpu avx2 avx_vnni\n", ("avx2", "avx_vnni"), True),
        ("model name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n", ("avx2",), False),
        ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", ("asimddp",), True),
        ("", (), False),
    ],
)
def test_cpu_flags_are_read_and_judged(text: str, flags: tuple, fast: bool) -> None:
    cpu = parse_cpuinfo(text)
    assert cpu.flags == flags and cpu.fast_int8 is fast
    assert cpu.model  # never empty, even without /proc/cpuinfo


def test_cache_dir_per_user_overridable(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PNEUMOEDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pneumoedge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pneumoedge"
    monkeypatch.setenv("PNEUMOEDGE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# -- the untuned rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "provenance, default, passed",
    [
        (PASSED, "fp32", True),  # passed; fp32 default for speed elsewhere (the bundled model's case)
        ({}, "int8", True),  # the export made int8 the default only because it passed
        ({}, "fp32", False),  # nothing says it passed
        ({"members": {"m": {"int8": {"meets_tolerance": False}}}}, "fp32", False),
        ({**PASSED, "metrics": {"int8_vs_fp32": {"max_prob_diff": 0.2, "agreement": 0.9}}}, "fp32", False),
        ({"int8": {"ok": True}}, "fp32", True),  # a foreign model's record
        ({"int8": {"ok": False}}, "fp32", False),
    ],
)
def test_int8_counts_as_passed_only_on_the_manifests_word(tmp_path: Path, provenance, default, passed) -> None:
    manifest = read_manifest(two_precision_bundle(tmp_path, provenance=provenance, default=default))
    assert tuning.int8_passed(manifest)[0] is passed


@pytest.mark.parametrize(
    "cpu, provenance, expected",
    [(VNNI, PASSED, "int8"), (AVX2, PASSED, "fp32"), (VNNI, {}, "fp32"), (AVX2, {}, "fp32")],
)
def test_untuned_rule_needs_a_passed_int8_and_vnni(tmp_path: Path, monkeypatch, cpu, provenance, expected) -> None:
    use_cpu(monkeypatch, cpu)
    bundle = two_precision_bundle(tmp_path, provenance=provenance)
    ensemble = pneumoedge.load(bundle, threads="auto")
    assert [m.precision for m in ensemble.members] == [expected]
    assert ensemble.configuration.source == "untuned" and "untuned" in ensemble.configuration.describe()
    assert ensemble.configuration.threads == 1  # a small model: one run per core


@pytest.mark.parametrize(
    "cpu, machine, latency, expected",
    [
        (AVX2, AVX2.to_dict(), {"fp32": 30.0, "int8": 23.0}, "int8"),  # measured faster on a CPU like this one
        (AVX2, AVX2.to_dict(), {"fp32": 30.0, "int8": 29.5}, "fp32"),  # within the margin
        (VNNI, VNNI.to_dict(), {"fp32": 30.0, "int8": 33.0}, "fp32"),  # VNNI, yet measured slower here
        (VNNI, AVX2.to_dict(), {"fp32": 30.0, "int8": 33.0}, "int8"),  # timed elsewhere: the flags decide
        (AVX2, None, {"fp32": 30.0, "int8": 23.0}, "fp32"),  # no machine recorded: the flags decide
    ],
)
def test_untuned_rule_trusts_the_exports_timing_on_a_similar_cpu(tmp_path: Path, cpu, machine, latency, expected) -> None:
    provenance = {"members": {"m": {"int8": {"meets_tolerance": True, "latency_ms": latency}}}}
    if machine is not None:
        provenance["machine"] = machine
    config = tuning.rule(read_manifest(two_precision_bundle(tmp_path, provenance=provenance)), cpu)
    assert config.precision == expected
    assert ("export timed" in config.reason) == (machine is not None and machine["simd"] == list(cpu.flags))


def test_big_models_run_on_all_cores(tmp_path: Path) -> None:
    manifest = read_manifest(two_precision_bundle(tmp_path))
    small = tuning.rule(manifest, AVX2)
    big = tuning.rule(manifest, AVX2, model_bytes=tuning.BIG_MODEL_BYTES + 1)
    assert (small.threads, small.runners) == (1, small.runners) and big.threads is None and big.runners == 1


def test_user_choices_win_over_the_machine(tmp_path: Path, monkeypatch) -> None:
    use_cpu(monkeypatch, VNNI)
    bundle = two_precision_bundle(tmp_path)
    assert [m.precision for m in pneumoedge.load(bundle, precision="fp32").members] == ["fp32"]
    config = pneumoedge.load(bundle, precision="default", threads=2).configuration
    assert (config.precision, config.threads, config.source) == ("fp32", 2, "untuned + user precision/threads")
    with pytest.raises(pneumoedge.BundleError, match="precision must be one of"):
        pneumoedge.load(bundle, precision="fastest")


# -- tune and its cache -----------------------------------------------------------------------


@pytest.fixture
def small_images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(4):
        path = folder / f"{i}.png"
        cv2.imwrite(str(path), gradient_image(64, 64, i))
        paths.append(path)
    return paths


def test_tune_stores_a_choice_that_load_then_uses(tmp_path: Path, monkeypatch, small_images, own_cache: Path) -> None:
    use_cpu(monkeypatch, AVX2)
    bundle = two_precision_bundle(tmp_path)
    result = tune_bundle(bundle, budget_s=0.5, images=small_images)
    assert {r["precision"] for r in result.measured} == {"fp32", "int8"}  # both measured even on a tiny budget
    assert all(r["images_per_s"] > 0 and r["ok"] == r["images"] for r in result.measured)
    assert result.stored is not None and own_cache in result.stored.parents
    assert not any(p.name.startswith("tun") for p in bundle.iterdir())  # nothing written into the bundle
    record = json.loads(result.stored.read_text())
    assert record["key"]["bundle_sha256"] == tuning.bundle_sha256(read_manifest(bundle))
    assert record["key"]["simd"] == ["avx2"] and record["key"]["onnxruntime"]
    # Force a known winner to see load follow the record, whatever the machine measured.
    record["choice"] = {"precision": "int8", "threads": 2, "batch": 3, "reason": "test"}
    result.stored.write_text(json.dumps(record))
    config = pneumoedge.load(bundle, threads="auto").configuration
    assert (config.precision, config.threads, config.batch, config.source) == ("int8", 2, 3, "tuned")
    # A user's fixed precision takes the best measured row at that precision.
    fixed = pneumoedge.load(bundle, precision="fp32", threads="auto").configuration
    best_fp32 = max((r for r in record["measured"] if r["precision"] == "fp32"), key=lambda r: r["images_per_s"])
    assert (fixed.precision, fixed.threads, fixed.batch) == ("fp32", best_fp32["threads"], best_fp32["batch"])


def test_int8_must_beat_fp32_by_a_margin() -> None:
    rows = [{"precision": "fp32", "threads": 1, "batch": 8, "images_per_s": 100.0},
            {"precision": "int8", "threads": 1, "batch": 8, "images_per_s": 103.0}]
    assert choose(rows).precision == "fp32"
    rows[1]["images_per_s"] = 120.0
    assert choose(rows).precision == "int8"


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda text: text[: len(text) // 2], "damaged"),
        (lambda text: "[1, 2]", "damaged"),
        (lambda text: text.replace('"batch": 3', '"batch": -4'), "damaged"),
        (lambda text: text.replace('"precision": "int8"', '"precision": "fp16"'), "damaged"),
        (lambda text: re.sub(r'"bundle_sha256": "\w+"', '"bundle_sha256": "' + "0" * 64 + '"', text), "another bundle"),
        (lambda text: text.replace('"onnxruntime": "', '"onnxruntime": "0.'), "another bundle"),
    ],
)
def test_damaged_or_foreign_cache_entries_are_ignored_with_a_warning(tmp_path: Path, monkeypatch, damage, says) -> None:
    use_cpu(monkeypatch, AVX2)
    bundle = two_precision_bundle(tmp_path)
    manifest = read_manifest(bundle)
    path = tuning.store(manifest, "cpu", tuning.Configuration("int8", 2, 3, "tuned", "test"), [])
    path.write_text(damage(path.read_text()))
    config = pneumoedge.load(bundle, threads="auto").configuration
    assert config.source == "untuned" and config.precision == "fp32"
    assert len(config.warnings) == 1 and says in config.warnings[0] and str(path) in config.warnings[0]


def test_load_checks_the_members_it_opens_and_info_checks_them_all(tmp_path: Path) -> None:
    bundle = two_precision_bundle(tmp_path)
    with open(bundle / "m.int8.onnx", "ab") as handle:
        handle.write(b"\0")
    assert [m.precision for m in pneumoedge.load(bundle, precision="fp32").members] == ["fp32"]
    with pytest.raises(pneumoedge.BundleError, match=r"m\.int8\.onnx: checksum mismatch"):
        pneumoedge.load(bundle, precision="int8")
    result = runner.invoke(app, ["info", str(bundle)])
    assert result.exit_code == 2 and "checksum mismatch" in result.output


def test_optimized_graph_cache_gives_the_same_probabilities(tmp_path: Path, monkeypatch, own_cache: Path) -> None:
    """The cached optimized graph is written once, after the checksum passed, and predicts the same."""
    monkeypatch.setattr(machine, "OPTIMIZED_GRAPH_MIN_BYTES", 0)  # the test models are tiny
    bundle = two_precision_bundle(tmp_path)
    image = gradient_image(80, 60, 9)
    fresh = pneumoedge.load(bundle, precision="fp32").predict(image)
    cached_files = list((own_cache / "optimized").glob("*.onnx"))
    assert len(cached_files) == 1 and not list((own_cache / "optimized").glob(".*partial"))
    again = pneumoedge.load(bundle, precision="fp32").predict(image)
    assert again.probabilities == fresh.probabilities
    cached_files[0].write_bytes(b"damaged")  # a damaged cache file is rebuilt, never trusted
    rebuilt = pneumoedge.load(bundle, precision="fp32").predict(image)
    assert rebuilt.probabilities == fresh.probabilities and cached_files[0].stat().st_size > 100
    monkeypatch.setenv("PNEUMOEDGE_OPTIMIZED_CACHE", "0")
    assert pneumoedge.load(bundle, precision="fp32").predict(image).probabilities == fresh.probabilities


def test_a_changed_member_never_enters_the_optimized_cache(tmp_path: Path, monkeypatch, own_cache: Path) -> None:
    monkeypatch.setattr(machine, "OPTIMIZED_GRAPH_MIN_BYTES", 0)
    bundle = two_precision_bundle(tmp_path)
    other = mean_model(tmp_path / "other.onnx", SPEC_GRAY, a=(-9.0,))
    (bundle / "m.fp32.onnx").write_bytes(other.read_bytes())  # loadable, but not the bundle's file
    with pytest.raises(pneumoedge.BundleError, match="checksum mismatch"):
        pneumoedge.load(bundle, precision="fp32")
    assert not (own_cache / "optimized").exists() or not any((own_cache / "optimized").iterdir())


def test_big_member_is_not_rehashed_until_its_file_changes(tmp_path: Path, monkeypatch, own_cache: Path) -> None:
    monkeypatch.setattr(machine, "OPTIMIZED_GRAPH_MIN_BYTES", 0)
    bundle = two_precision_bundle(tmp_path)
    pneumoedge.load(bundle, precision="fp32")  # hashes, records the file, caches the graph
    member = bundle / "m.fp32.onnx"
    original = member.read_bytes()
    hashed = []
    real_sha256 = __import__("hashlib").sha256
    monkeypatch.setattr("hashlib.sha256", lambda data=b"": hashed.append(bytes(data)) or real_sha256(data))
    pneumoedge.load(bundle, precision="fp32")
    assert original not in hashed  # same inode, size, mtime and ctime: trusted, not hashed again
    member.write_bytes(mean_model(tmp_path / "other.onnx", SPEC_GRAY, a=(-9.0,)).read_bytes())
    with pytest.raises(pneumoedge.BundleError, match="checksum mismatch"):
        pneumoedge.load(bundle, precision="fp32")
    assert member.read_bytes() in hashed  # a written file is hashed again, and refused


# -- what users see ---------------------------------------------------------------------------


def test_cli_tune_then_infer_and_info_say_tuned(tmp_path: Path, small_images, own_cache: Path) -> None:
    bundle = two_precision_bundle(tmp_path)
    wide = {"COLUMNS": "200"}
    before = runner.invoke(app, ["infer", str(small_images[0].parent), "--model", str(bundle)], env=wide)
    assert before.exit_code == 0 and "untuned" in before.output
    tuned = runner.invoke(app, ["tune", str(bundle), "--budget", "1", "--images", str(small_images[0].parent)], env=wide)
    assert tuned.exit_code == 0, tuned.output
    assert "chosen:" in tuned.output and str(own_cache) in tuned.output
    after = runner.invoke(app, ["infer", str(small_images[0].parent), "--model", str(bundle)], env=wide)
    assert after.exit_code == 0 and "(tuned: `pneumoedge tune` on" in after.output
    info = runner.invoke(app, ["info", str(bundle), "--json"])
    assert json.loads(info.output)["configuration"]["source"] == "tuned"


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", "{missing}"], "tune needs a bundle folder"),
        (["tune", "{bundle}", "--images", "{missing}"], "no such folder"),
        (["tune", "{bundle}", "--budget", "0"], "Invalid value"),
    ],
)
def test_cli_tune_user_errors(tmp_path: Path, args, message) -> None:
    bundle = two_precision_bundle(tmp_path)
    filled = [a.format(bundle=bundle, missing=tmp_path / "nope") for a in args]
    result = runner.invoke(app, filled)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_corrupt_cache_warns_in_the_infer_summary_and_the_run_goes_on(tmp_path: Path, small_images) -> None:
    bundle = two_precision_bundle(tmp_path)
    path = tuning.store(read_manifest(bundle), "cpu", tuning.Configuration("fp32", 1, 8, "tuned", "t"), [])
    path.write_text("{not json")
    result = runner.invoke(app, ["infer", str(small_images[0].parent), "--model", str(bundle)], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "warning:" in result.output and "is damaged" in result.output


# -- 80-column terminals ------------------------------------------------------------------------


def _lines_fit(render, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    render(console)
    return console.export_text().splitlines()


def test_bench_table_reads_in_80_columns() -> None:
    """Every row of the latency table stays one line: no cell wraps into fragments."""
    from pneumoedge.commands.bench import print_report

    stats = {k: 12.345 for k in ("count", "min", "mean", "std", "p50", "p90", "p95", "p99", "max")}
    stats["max"] = 98765.4  # a long stall: the widest number a cell must hold
    member = {"name": "cnn4_gray256_long_member_name", "precision": "int8", "session_create_ms": 123.4, "first_inference_ms": 45.6,
              "model_only_ms": stats, "model_only_batch_ms": stats, "preprocess_ms": stats}
    report = {
        "machine": {"cpu": "Intel(R) Xeon(R) Platinum 8480C with a long marketing name", "physical_cores": 2, "os": "Linux-6.1-x86_64-with-glibc2.36",
                    "simd": "avx2 avx512f avx512_vnni amx_int8 amx_tile"},
        "versions": {"onnxruntime": "1.32.0", "numpy": "2.3.4", "opencv": "5.0.0", "pneumoedge": "0.1.0"},
        "settings": {"images": 6, "images_source": "6 generated phantoms 1400x1200 (5 JPEG, 1 16-bit PNG)", "megapixels_mean": 1.68,
                     "runs": 50, "warmup": 5, "threads": None, "batch": 8},
        "members": [member, {**member, "name": "cnn3_gray150"}],
        "ensemble": {"provider": "CPUExecutionProvider", "decode_ms": stats, "tensors_ms": stats, "model_only_ms": stats,
                     "end_to_end_ms": stats, "load_ms": 1234.5, "first_inference_ms": 99.9,
                     "split": {"decode_fraction": 0.5, "tensors_fraction": 0.2, "model_fraction": 0.3},
                     "throughput": {"images_per_s": 77.7, "images": 64, "batch": 8, "seconds": 0.82}},
        "memory": {"peak_rss_mb": 321.0},
    }
    lines = _lines_fit(lambda console: print_report(report, console))
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if "12.3" in line]
    assert not any("…" in row for row in rows), "\n".join(lines)  # no figure or number cut short
    # One line per figure (3 per member, 4 for the ensemble); a wrapped cell would split a label
    # from its numbers or add lines.
    assert len(rows) == 2 * 3 + 4, "\n".join(lines)
    for label in ("model, batch 1", "model, batch 8", "preprocess", "read + decode", "tensors, all", "models, all", "end to end"):
        assert any(label in row for row in rows), label
    assert any("cnn3_gray150 int8" in line for line in lines) and any("1234" in row and "end to end" in row and "98765" in row for row in rows)
