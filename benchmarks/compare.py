"""Side-by-side latency of the same two models on the same images: founding Keras way, Keras,
TFLite/LiteRT and pneumoedge (onnxruntime), each measured in its own fresh process, one after
another; writes RESULTS.md and results.json.

    python benchmarks/compare.py                    # full run (~10 min on 2 cores): benchmarks/RESULTS.md
    python benchmarks/compare.py --quick --out DIR  # reduced run for the test suite (< 60 s)

Run it on a quiet machine; `--note` records the conditions (load) in the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import re
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import coldstart, report, static  # noqa: E402
from pneumoedge.benchmarking.measure import library_versions, machine_info  # noqa: E402

SCHEMA = "pneumoedge.compare/1"
NAMES = ("cnn3_gray150", "cnn4_gray256")
#: Load averages seen before each measurement: a busy machine shows here (our own work adds about 1-2).
LOAD_SEEN: list = []


def _args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="folder for RESULTS.md and results.json")
    parser.add_argument("--quick", action="store_true", help="tiny images, few runs, one model (the test suite's mode)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--keras-runs", type=Path, default=Path("/tmp/pneumoedge-default-build/runs"),
                        help="run folders <arch>/model.keras; absent: untrained models of the same architectures")
    parser.add_argument("--images", type=int, default=None, help="number of generated images (default 24; quick 3)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 60; quick 5)")
    parser.add_argument("--flat-images", type=int, default=None, help="images in the memory-flatness run (default 10000; quick 60)")
    parser.add_argument("--note", default="", help="conditions of this run (e.g. machine load), recorded in the results")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: write RESULTS.md in --out again from this results.json")
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "quick": quick,
        "images": args.images or (3 if quick else 24),
        "size": ((300, 360), (300, 360)) if quick else ((1000, 1600), (1000, 1600)),
        "sixteen_bit_fraction": 0.0 if quick else 0.15,
        "runs": args.runs or (5 if quick else 60),
        "warmup": 1 if quick else 5,
        "batch": 8,
        "throughput_images": 8 if quick else 120,
        "flat_images": args.flat_images or (60 if quick else 10000),
        "models": list(NAMES[:1] if quick else NAMES),
        "gemm_size": 256 if quick else 2048,
        "gemm_runs": 3 if quick else 10,
        "cold_repeats": 1 if quick else 5,
        "threads": os.cpu_count() or 1,
    }


def _images(folder: Path, s: dict[str, Any]) -> list[str]:
    from pneumoedge.datasets.phantoms import generate_dataset

    per_kind = {"normal": s["images"] - 2 * (s["images"] // 3), "bacteria": s["images"] // 3, "virus": s["images"] // 3}
    generate_dataset(folder, counts={"test": per_kind}, size=s["size"], seed=4, sixteen_bit_fraction=s["sixteen_bit_fraction"])
    return sorted(str(p) for p in folder.rglob("*") if p.suffix in (".jpeg", ".png"))


def _worker(task: str, cfg: dict[str, Any], work: Path, env: Optional[dict] = None, timeout: int = 1800) -> dict[str, Any]:
    """Run one task in a fresh Python process; its JSON result, or {"error": ...}."""
    LOAD_SEEN.append(_loadavg())
    config, out = work / f"{task}.{cfg.get('label', '')}.cfg.json", work / f"{task}.{cfg.get('label', '')}.out.json"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.workers", task, str(config), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {task} {cfg.get('label', '')}: FAILED: {' | '.join(tail)}", file=sys.stderr)
        return {"error": " | ".join(tail)}
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - start
    result["ended_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # to line up with others' jobs on a shared machine
    print(f"  {task} {cfg.get('label', '')}: {result['wall_s']:.0f} s", file=sys.stderr)
    return result


def _versions() -> dict[str, str]:
    versions = library_versions()
    for dist in ("tensorflow", "keras", "ai-edge-litert", "pillow", "tf2onnx"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    s = _settings(args)
    manifest = json.loads((args.bundle / "manifest.json").read_text(encoding="utf-8"))
    started, load_start = time.perf_counter(), _loadavg()
    with tempfile.TemporaryDirectory(prefix="pneumoedge-compare-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        images = _images(work / "images", s)
        checks = static.keras_run_check(args.keras_runs, manifest, s["models"])
        for name, check in checks.items():  # a snapshot: a rebuild of the runs during this comparison cannot pull them away
            if check["keras"]:
                snapshot = work / "keras" / f"{name}.keras"
                snapshot.parent.mkdir(exist_ok=True)
                shutil.copyfile(check["keras"], snapshot)
                check["snapshot"] = str(snapshot)
        base = {
            "images": images, "bundle": str(args.bundle), "runs": s["runs"], "warmup": s["warmup"], "batch": s["batch"],
            "throughput_images": s["throughput_images"], "threads": s["threads"], "flat_images": s["flat_images"],
            "models": [{"name": n, "keras": checks[n].get("snapshot")} for n in s["models"]],
            "calibration_images": images, "tflite_dir": str(work / "tflite"), "gemm_size": s["gemm_size"], "gemm_runs": s["gemm_runs"],
        }
        print(f"compare: {len(images)} images, models {s['models']}, work {work}", file=sys.stderr)
        r: dict[str, Any] = {"runtimes": {}}
        rt = r["runtimes"]
        tf_tasks = ("founding", "keras", "tflite_convert")
        if s["quick"]:  # one TensorFlow process instead of three
            several = _worker("several", dict(base, label="tf", tasks=tf_tasks), work)
            done = {t: several.get(t, several) for t in tf_tasks}
        else:
            done = {t: _worker(t, dict(base, label=t), work) for t in tf_tasks}
        rt["founding"], rt["keras"], r["tflite_conversion"] = (done[t] for t in tf_tasks)
        for precision in ("fp32", "int8"):
            if "error" not in r["tflite_conversion"]:
                rt[f"tflite_{precision}"] = _worker("tflite", dict(base, label=precision, precision=precision), work)
            for threads in (s["threads"],) if s["quick"] else (s["threads"], 1):
                rt[f"pneumoedge_{precision}_t{threads}"] = _worker("ort", dict(base, label=f"{precision}{threads}", precision=precision, threads=threads), work)
        one = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        r["gemm"] = {"all_cores": _worker("gemm", dict(base, label="all", gemm_threads=s["threads"]), work),
                     "one_core": _worker("gemm", dict(base, label="one", gemm_threads=1), work, env=one)}
        r["flatness"] = _worker("flatness", dict(base, label="int8", precision="int8"), work)
        r["cold_start"] = coldstart.measure_all(args.bundle, images[0], checks, s, work / "tflite")
        r["installed"] = static.installed_sizes()
        r["optimized_ops"] = {f"{n}.{p}": static.optimized_ops(args.bundle / m["file"]) for n in s["models"] for p in ("fp32", "int8")
                              for m in manifest["members"] if m["name"] == n and m["precision"] == p}
        r["flops"] = {n: static.onnx_macs(args.bundle / next(m["file"] for m in manifest["members"] if m["name"] == n and m["precision"] == "fp32")) for n in s["models"]}
    r.update(
        schema=SCHEMA,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        note=args.note,
        load_average_start=load_start,
        machine=dict(machine_info(), cpu_flags=_simd_flags()),
        versions=_versions(),
        settings=s,
        git_commit=_git_head(),
        bundle={"path": str(args.bundle), "name": manifest.get("name"), "default_precision": manifest.get("default_precision"),
                "members": {m["file"]: m["sha256"][:12] for m in manifest["members"]},
                "decode_reduction": sorted({m["spec"].get("decode_reduction", 1) for m in manifest["members"]})},
        keras_runs=checks,
        elapsed_s=time.perf_counter() - started,
    )
    r["load_average_end"] = _loadavg()
    seen = [l[0] for l in LOAD_SEEN if l]
    r["load_average_1min_max"] = max(seen) if seen else None
    return r


def _git_head() -> Optional[str]:
    """The checkout's commit (and whether it had changes): which code and bundle these figures belong to."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pneumoedge", "models", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" with uncommitted changes" if dirty else "")) or None


def _simd_flags() -> list[str]:
    """The CPU's vector/dot-product instruction sets that decide int8 vs fp32 speed (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in ("avx2", "fma", "f16c") or f.startswith("avx512") or "vnni" in f or f.startswith("amx"))


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _write_results_md(path: Path, text: str) -> None:
    """Write RESULTS.md, keeping the sections other benchmark scripts own (between <!-- NAME:start/end --> markers)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    sections = [m.group(0) for m in re.finditer(r"<!-- (\w+):start -->.*?<!-- \1:end -->", old, flags=re.S)]
    path.write_text("\n\n".join([text.rstrip("\n"), *sections]) + "\n", encoding="utf-8")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text(encoding="utf-8"))
        args.out.mkdir(parents=True, exist_ok=True)
        _write_results_md(args.out / "RESULTS.md", report.render(results))
        return 0
    results = run(args, " ".join(shlex.quote(a) for a in ["python", "benchmarks/compare.py", *argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    _write_results_md(args.out / "RESULTS.md", report.render(results))
    print(f"wrote {args.out / 'RESULTS.md'} and results.json in {results['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
