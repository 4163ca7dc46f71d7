"""Whole-process time: `pneumoedge infer` on a folder against a plain sequential onnxruntime loop.

The plain loop is what anyone would write in six lines: cv2 decode (the same decode the
model's spec asks for), cv2 resize, one session per model file, one image at a time. Both
sides run as fresh processes on the same X-ray-sized phantom JPEGs, alternately, several
times; wall time includes interpreter start, imports, model loading and writing results.

    python benchmarks/plain_loop.py                          # default bundle + Xception-size model
    python benchmarks/plain_loop.py --models default --repeats 5
    python benchmarks/plain_loop.py --json /tmp/after.json
    PYTHONPATH=/tmp/old-checkout python benchmarks/plain_loop.py --json /tmp/before.json   # an older pneumoedge
    python benchmarks/plain_loop.py --record --before /tmp/before.json --tune-budget 30 --note "..."
        # measures, runs `pneumoedge tune` on the default bundle, rewrites its section of benchmarks/RESULTS.md

The Xception-size model (keras.applications.Xception, weights=None, 299x299x3, 2 classes;
20.9 M parameters, random weights: timing only) is built once with the [export] extra and
kept under /tmp/pneumoedge-xception (never in the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
XCEPTION_DIR = Path(os.environ.get("PNEUMOEDGE_XCEPTION_DIR", "/tmp/pneumoedge-xception"))

# The plain loop, run with `python -c`: only cv2, numpy and onnxruntime. argv: folder, then
# for each model file: path, height, width, gray(0/1), reduction, interpolation, scale, offset.
PLAIN_LOOP = r"""
import sys, glob, cv2, numpy as np, onnxruntime as ort
folder, rest = sys.argv[1], sys.argv[2:]
models = [rest[i:i + 8] for i in range(0, len(rest), 8)]
sessions = [(ort.InferenceSession(m[0], providers=["CPUExecutionProvider"]), int(m[1]), int(m[2]), m[3] == "1",
             int(m[4]), int(m[5]), float(m[6]), float(m[7])) for m in models]
flags = {1: cv2.IMREAD_UNCHANGED, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
for path in sorted(glob.glob(folder + "/*.jpeg")):
    img = cv2.imread(path, flags[sessions[0][4]] if sessions[0][3] else cv2.IMREAD_COLOR_RGB)  # members share a decode
    for s, h, w, gray, red, interp, scale, offset in sessions:
        x = cv2.resize(img.astype(np.float32), (w, h), interpolation=interp) * scale + offset
        s.run(None, {s.get_inputs()[0].name: x.reshape(1, h, w, -1)})
"""


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_phantoms(folder: Path, n: int, seed: int = 13) -> None:
    """`n` X-ray-sized (1024-1600 px) synthetic phantoms as JPEG q90: not patients, timing only."""
    import cv2
    import numpy as np

    from pneumoedge.datasets.phantoms import KINDS, render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        height, width = int(rng.integers(1024, 1601)), int(rng.integers(1024, 1601))
        pixels = render_phantom(rng, KINDS[i % len(KINDS)], height, width, sixteen_bit=False)
        cv2.imwrite(str(folder / f"phantom_{i:03d}.jpeg"), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])


def build_xception(out: Path) -> Path:
    """An Xception-size bundle (random weights), exported through pneumoedge's own export."""
    if (out / "manifest.json").is_file():
        return out
    keras_file = out.parent / "xception_random.keras"
    if not keras_file.is_file():
        code = (
            "import keras; keras.applications.Xception(weights=None, input_shape=(299, 299, 3), classes=2)"
            f".save({str(keras_file)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run(
        [sys.executable, "-m", "pneumoedge", "export", str(keras_file), "--out", str(out), "--size", "299", "299",
         "--color", "rgb", "--resize", "bilinear", "--scale", "1/127.5", "--offset", "-1",
         "--labels", "NORMAL,PNEUMONIA", "--head", "softmax", "--name", "xception-random"],
        check=True,
    )
    return out


def plain_args(bundle: Path, precision: str) -> list[str]:
    """The plain loop's arguments for the bundle's members at `precision` (same decode and resize)."""
    from pneumoedge.bundle import read_manifest
    from pneumoedge.preprocessing import RESIZE_METHODS

    manifest = read_manifest(bundle, verify=False)
    args = []
    for member in manifest.members_for(precision):
        spec = member.card.spec
        if spec.mean is not None or spec.std is not None or spec.layout != "NHWC":
            raise SystemExit(f"{bundle}: the plain loop here handles scale/offset NHWC specs only")
        args += [str(member.path), str(spec.height), str(spec.width), "1" if spec.color == "gray" else "0",
                 str(spec.decode_reduction), str(RESIZE_METHODS[spec.resize]), repr(spec.scale), repr(spec.offset)]
    return args


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of one fresh process. CPU time is the figure that
    a busy shared machine disturbs least: it counts the work done, not the waiting for a core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # 1: some inputs failed, still a complete run
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(name: str, bundle: Path, precision: str, images: Path, repeats: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="pneumoedge-plain-")) / "results.csv"
    infer = [sys.executable, "-m", "pneumoedge", "infer", str(images), "--model", str(bundle), "--precision", precision,
             "--out", str(out), "--overwrite", "--no-progress", *extra]
    plain = [sys.executable, "-c", PLAIN_LOOP, str(images), *plain_args(bundle, precision)]
    timed(plain), timed(infer)  # warm the page cache for both
    rows = []
    for _ in range(repeats):
        load = load_average()
        (plain_s, plain_cpu), (infer_s, infer_cpu) = timed(plain), timed(infer)
        rows.append({"plain_s": plain_s, "plain_cpu_s": plain_cpu, "infer_s": infer_s, "infer_cpu_s": infer_cpu, "load_average": load})
    result = {"model": name, "bundle": str(bundle), "precision": precision, "extra": extra, "runs": rows}
    for key in ("plain_s", "infer_s", "plain_cpu_s", "infer_cpu_s"):
        result[key.replace("_s", "_median_s")] = statistics.median(r[key] for r in rows)
        result[key.replace("_s", "_min_s")] = min(r[key] for r in rows)
    print(
        f"{name:<9} {precision:<5} {' '.join(extra) or '-':<12} wall: plain {result['plain_median_s']:.2f} s "
        f"(min {result['plain_min_s']:.2f}), infer {result['infer_median_s']:.2f} s (min {result['infer_min_s']:.2f}); "
        f"CPU: plain {result['plain_cpu_median_s']:.2f} s, infer {result['infer_cpu_median_s']:.2f} s; "
        f"load {rows[0]['load_average']}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,xception", help="comma-separated: default, xception")
    parser.add_argument("--images", type=int, default=32, help="phantom JPEGs in the folder")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--precision", default="fp32", help="comma-separated precisions for the default bundle")
    parser.add_argument("--infer-args", default="", help="extra arguments for pneumoedge infer, e.g. '--threads 2'")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--record", action="store_true", help="rewrite this script's section of benchmarks/RESULTS.md")
    parser.add_argument("--before", type=Path, help="figures (--json) of an older checkout, shown beside these")
    parser.add_argument("--tune-budget", type=float, default=0.0, help="also run `pneumoedge tune` on the default bundle (seconds)")
    parser.add_argument("--note", default="", help="conditions to record (other jobs running, ...)")
    options = parser.parse_args(argv)

    from pneumoedge.runtime.loading import default_bundle_path

    try:
        from pneumoedge.runtime.machine import cpu_info
    except ImportError:  # an older checkout on PYTHONPATH, for before/after figures: this checkout's module
        import importlib.util

        spec = importlib.util.spec_from_file_location("_machine", ROOT / "pneumoedge" / "runtime" / "machine.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_machine"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        cpu_info = module.cpu_info

    cpu = cpu_info()
    print(f"machine: {cpu.model}, {cpu.logical_cores} logical CPUs, SIMD: {cpu.flags_text}; load {load_average()}")
    images = Path(tempfile.mkdtemp(prefix="pneumoedge-plain-images-"))
    write_phantoms(images, options.images)
    extra = options.infer_args.split()
    results = []
    for name in options.models.split(","):
        if name == "default":
            for precision in options.precision.split(","):
                results.append(compare(name, default_bundle_path(), precision, images, options.repeats, extra))
        elif name == "xception":
            results.append(compare(name, build_xception(XCEPTION_DIR / "bundle"), "fp32", images, options.repeats, extra))
        else:
            parser.error(f"unknown model {name!r}")
    record = {"machine": cpu.to_dict(), "images": options.images, "results": results,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": ["python", *sys.argv]}
    if options.tune_budget > 0:
        record["tune"] = run_tune(default_bundle_path(), options.tune_budget)
    if options.json:
        options.json.write_text(json.dumps(record, indent=2) + "\n")
    if options.record:
        before = json.loads(options.before.read_text()) if options.before else None
        write_section(ROOT / "benchmarks" / "RESULTS.md", render(record, before, options.note))
    return 0


def run_tune(bundle: Path, budget: float) -> dict:
    """`pneumoedge tune` on `bundle` (the library call), as it would run on this machine."""
    from pneumoedge.benchmarking.tune import tune

    load = load_average()
    result = tune(bundle, budget_s=budget)
    return {"load_average": load, "seconds": result.seconds, "choice": result.choice.to_dict(), "measured": result.measured,
            "skipped": result.skipped}


MARKERS = ("<!-- plain_loop:start -->", "<!-- plain_loop:end -->")


def render(record: dict, before: dict | None, note: str) -> str:
    """The RESULTS.md section: machine and flags, the plain-loop table (before/after), the tune rows."""
    machine = record["machine"]
    lines = [
        MARKERS[0],
        "## Whole process: `pneumoedge infer` vs a plain onnxruntime loop; `pneumoedge tune`",
        "",
        f"- **Date**: {record['created']}; **command**: `{' '.join(record['command'])}`",
        f"- **Machine**: {machine['cpu']}, {machine['logical_cores']} logical cores; **SIMD**: "
        f"{' '.join(machine['simd']) or 'no AVX2/VNNI/AMX'}; VNNI/AMX for int8: {'yes' if machine['fast_int8'] else '**no**'}",
        f"- **Conditions**: {note or 'not noted'}; load average beside each row (1, 5, 15 min, at the row's start)",
        f"- **Protocol**: {record['images']} X-ray-sized phantom JPEGs (1024-1600 px, synthetic); each side a fresh process, "
        "alternating, 3 runs after one warm-up each; medians. The plain loop: cv2 decode as the spec asks, cv2 resize, one "
        "session per model file (onnxruntime's default threads), one image at a time. CPU = user + system seconds of the "
        "process: the figure other jobs on a shared machine disturb least.",
        "",
        "| model | precision | plain loop wall s | `infer` wall s | plain CPU s | `infer` CPU s | infer / plain (wall) | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def rows(data: dict, label: str) -> None:
        for r in data["results"]:
            lines.append(
                f"| {r['model']} {label} | {r['precision']} | {r['plain_median_s']:.2f} | **{r['infer_median_s']:.2f}** | "
                f"{r.get('plain_cpu_median_s', float('nan')):.2f} | {r.get('infer_cpu_median_s', float('nan')):.2f} | "
                f"{r['infer_median_s'] / r['plain_median_s']:.2f} | {r['runs'][0]['load_average']} |"
            )

    if before:
        rows(before, "(before)")
    rows(record, "(now)" if before else "")
    tune = record.get("tune")
    if tune:
        choice = tune["choice"]
        lines += [
            "",
            f"`pneumoedge tune` on the default bundle ({tune['seconds']:.0f} s, load {tune['load_average']}): chosen "
            f"**{choice['precision']}, threads {choice['threads']} x {choice['runners']} runners, batch {choice['batch']}** "
            f"({choice['reason']}).",
            "",
            "| precision | threads | runners | batch | images/s | load |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(tune["measured"], key=lambda r: -r["images_per_s"]):
            lines.append(f"| {r['precision']} | {r['threads']} | {r['runners']} | {r['batch']} | {r['images_per_s']:.1f} | {r['load_average']} |")
    lines += ["", "Reproduce: `python benchmarks/plain_loop.py --record` (docs/speed.md). This section is rewritten by that script only.",
              MARKERS[1]]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(MARKERS[1]):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
