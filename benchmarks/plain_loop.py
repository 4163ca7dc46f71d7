"""Whole-process time: `pneumoedge infer` with its defaults against the six-line onnxruntime loop.

The plain loop is what anyone would write: cv2.imread (the decode the model's spec asks for),
cv2.resize, one `InferenceSession` per fp32 model file with onnxruntime's default threads, one
image at a time; it computes no out-of-distribution score and writes nothing. `infer` runs with
its defaults (precision and threads chosen for this computer, OOD and all) and writes its CSV.
Both sides are fresh processes on the same X-ray-sized synthetic JPEGs (1-2.5 Mpx), one warm-up
each, then alternating runs; the figure is the median, with the min-max spread beside it,
because the machine is shared. Wall time includes interpreter start, imports, model loading
and writing results; CPU time (user + system) is what other jobs disturb least.

    python benchmarks/plain_loop.py                                  # default bundle + every zoo model, 32 images
    python benchmarks/plain_loop.py --models default,mobilenetv2 --images 32,500 --repeats 3
    python benchmarks/plain_loop.py --models default,zoo --images 32,500 --stages --record --note "..."
        # rewrites its section of benchmarks/RESULTS.md

Models: `default` (the bundled one), `zoo` (every model listed in $PNEUMOEDGE_ZOO/READY, default
/work/zoo, built by benchmarks/zoo_build.py: keras.applications backbones trained on phantoms,
demonstrations only), a zoo name, or a bundle folder. `--stages` adds `pneumoedge bench`'s
per-image stage costs (decode, preprocess, model, OOD, heatmap, overlay, row) for each model.
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
sys.path.insert(0, str(ROOT))
from benchmarks.results_md import markers, write_section  # noqa: E402
ZOO = Path(os.environ.get("PNEUMOEDGE_ZOO", "/work/zoo"))

# The plain loop, run with `python -c`: only cv2, numpy and onnxruntime. argv: folder, then
# for each model file: path, height, width, gray(0/1), reduction, interpolation, scale, offset,
# mean, std (comma-separated per channel, or "-").
PLAIN_LOOP = r"""
import sys, glob, cv2, numpy as np, onnxruntime as ort
folder, rest = sys.argv[1], sys.argv[2:]
models = [rest[i:i + 10] for i in range(0, len(rest), 10)]
norm = lambda text: None if text == "-" else np.array([float(v) for v in text.split(",")], np.float32)
sessions = [(ort.InferenceSession(m[0], providers=["CPUExecutionProvider"]), int(m[1]), int(m[2]), m[3] == "1",
             int(m[4]), int(m[5]), float(m[6]), float(m[7]), norm(m[8]), norm(m[9])) for m in models]
flags = {1: cv2.IMREAD_UNCHANGED, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
for path in sorted(glob.glob(folder + "/*.jpeg")):
    img = cv2.imread(path, flags[sessions[0][4]] if sessions[0][3] else cv2.IMREAD_COLOR_RGB)  # members share a decode
    for s, h, w, gray, red, interp, scale, offset, mean, std in sessions:
        x = cv2.resize(img.astype(np.float32), (w, h), interpolation=interp) * scale + offset
        x = x if mean is None else x - mean
        x = x if std is None else x / std
        s.run(None, {s.get_inputs()[0].name: x.reshape(1, h, w, -1)})
"""


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_phantoms(folder: Path, n: int, seed: int = 13) -> None:
    """`n` X-ray-sized (1024-1600 px a side) synthetic phantoms as JPEG q90: not patients, timing only."""
    import cv2
    import numpy as np

    from pneumoedge.datasets.phantoms import KINDS, render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        height, width = int(rng.integers(1024, 1601)), int(rng.integers(1024, 1601))
        pixels = render_phantom(rng, KINDS[i % len(KINDS)], height, width, sixteen_bit=False)
        cv2.imwrite(str(folder / f"phantom_{i:03d}.jpeg"), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])


def image_folders(counts: list[int]) -> dict[int, Path]:
    """One folder per count, the first N files of one pool (links, so the bytes are the same files)."""
    base = Path(tempfile.mkdtemp(prefix="pneumoedge-plain-images-"))
    pool = base / "pool"
    write_phantoms(pool, max(counts))
    files = sorted(pool.glob("*.jpeg"))
    folders = {}
    for count in counts:
        folder = base / f"n{count}"
        folder.mkdir()
        for path in files[:count]:
            (folder / path.name).symlink_to(path)
        folders[count] = folder
    return folders


def models(names: str) -> list[tuple[str, Path]]:
    """(name, bundle folder) for `default`, `zoo`, zoo names and bundle paths."""
    from pneumoedge.runtime.loading import default_bundle_path

    zoo = {}
    if (ZOO / "READY").is_file():
        for line in (ZOO / "READY").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                zoo[parts[0]] = Path(parts[1])
    chosen = []
    for name in names.split(","):
        if name == "default":
            chosen.append(("default", default_bundle_path()))
        elif name == "zoo":
            chosen += sorted(zoo.items())
        elif name in zoo:
            chosen.append((name, zoo[name]))
        elif (Path(name) / "manifest.json").is_file():
            chosen.append((Path(name).name, Path(name)))
        else:
            raise SystemExit(f"unknown model {name!r}: not default, zoo, a model in {ZOO / 'READY'} or a bundle folder")
    return chosen


def plain_args(bundle: Path) -> list[str]:
    """The plain loop's arguments for the bundle's fp32 members (same decode and resize as their spec)."""
    from pneumoedge.bundle import read_manifest
    from pneumoedge.preprocessing import RESIZE_METHODS

    manifest = read_manifest(bundle, verify=False)
    args = []
    for member in manifest.members_for("fp32"):
        spec = member.card.spec
        if spec.layout != "NHWC":
            raise SystemExit(f"{bundle}: the plain loop here handles NHWC specs only")
        norm = ["-" if v is None else ",".join(repr(x) for x in v) for v in (spec.mean, spec.std)]
        args += [str(member.path), str(spec.height), str(spec.width), "1" if spec.color == "gray" else "0",
                 str(spec.decode_reduction), str(RESIZE_METHODS[spec.resize]), repr(spec.scale), repr(spec.offset), *norm]
    return args


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # 1: some inputs failed, still a complete run
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(name: str, bundle: Path, images: Path, count: int, repeats: int, extra: list[str]) -> dict:
    """Alternating fresh-process runs of both sides on one folder; medians and spreads."""
    import pneumoedge

    out = Path(tempfile.mkdtemp(prefix="pneumoedge-plain-")) / "results.csv"
    infer = [sys.executable, "-m", "pneumoedge", "infer", str(images), "--model", str(bundle),
             "--out", str(out), "--overwrite", "--no-progress", *extra]
    plain = [sys.executable, "-c", PLAIN_LOOP, str(images), *plain_args(bundle)]
    configuration = pneumoedge.load(bundle, threads="auto").configuration.describe()  # what infer's defaults pick here
    if count <= 100:
        timed(plain), timed(infer)  # warm the page cache and the optimized-graph cache for both
    else:  # a big folder: its files into the page cache (the caches were warmed by a small folder's runs)
        for path in images.iterdir():
            path.read_bytes()
    rows = []
    for i in range(repeats):
        load = load_average()
        sides = [("plain", plain), ("infer", infer)] if i % 2 == 0 else [("infer", infer), ("plain", plain)]
        row = {"load_average": load, "first": sides[0][0]}
        for side, command in sides:
            row[f"{side}_s"], row[f"{side}_cpu_s"] = timed(command)
        rows.append(row)
    result = {"model": name, "bundle": str(bundle), "images": count, "configuration": configuration, "extra": extra, "runs": rows}
    for key in ("plain_s", "infer_s", "plain_cpu_s", "infer_cpu_s"):
        values = [r[key] for r in rows]
        stem = key[:-2]
        result[f"{stem}_median_s"], result[f"{stem}_min_s"], result[f"{stem}_max_s"] = statistics.median(values), min(values), max(values)
    result["ratio"] = result["infer_median_s"] / result["plain_median_s"]
    print(
        f"{name:<15} {count:>4} images  wall: plain {result['plain_median_s']:.2f} s [{result['plain_min_s']:.2f}-{result['plain_max_s']:.2f}], "
        f"infer {result['infer_median_s']:.2f} s [{result['infer_min_s']:.2f}-{result['infer_max_s']:.2f}] = {result['ratio']:.2f}x; "
        f"CPU: plain {result['plain_cpu_median_s']:.2f} s, infer {result['infer_cpu_median_s']:.2f} s; load {rows[0]['load_average']}; {configuration}",
        flush=True,
    )
    return result


def stages(name: str, bundle: Path, images: Path) -> dict:
    """`pneumoedge bench`'s per-image stage costs (batch 1, medians) on six of the images."""
    from pneumoedge.benchmarking.bench import BenchSettings, run_bench

    files = sorted(images.glob("*.jpeg"))[:6]
    load = load_average()
    report = run_bench(bundle, files, BenchSettings(runs=10, warmup=2, throughput_images=16), command=["plain_loop.py", "--stages"])
    member = report["members"][0]
    figures = {"model": name, "load_average": load, "stages_ms": report["ensemble"]["stages_ms"],
               "input": "x".join(str(v) for v in member["input_shape"]), "precision": member["precision"],
               "model_batch1_ms": member["model_only_ms"]["p50"]}
    print(f"{name:<15} stages (ms/image): " + ", ".join(f"{k} {v:.2f}" for k, v in figures["stages_ms"].items() if v is not None), flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,zoo", help="comma-separated: default, zoo, zoo names, bundle folders")
    parser.add_argument("--images", default="32", help="comma-separated image counts, e.g. 32,500")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (after one warm-up each)")
    parser.add_argument("--large-repeats", type=int, default=2, help="alternating runs for folders of more than 100 images")
    parser.add_argument("--infer-args", default="", help="extra arguments for pneumoedge infer, e.g. '--threads 2'")
    parser.add_argument("--stages", action="store_true", help="also measure bench's per-image stage costs of each model")
    parser.add_argument("--stages-only", action="store_true", help="measure only the stage costs (no whole-process runs)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--record", action="store_true", help="rewrite this script's section of benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="conditions to record (other jobs running, ...)")
    parser.add_argument("--merge", type=Path, nargs="+", help="measure nothing: join these --json files (runs of the same protocol) for --record")
    options = parser.parse_args(argv)
    if options.merge:
        records = [json.loads(path.read_text()) for path in options.merge]
        results = {(r["model"], r["images"]): r for rec in records for r in rec["results"]}  # a later file's figure wins
        stage_rows = {s["model"]: s for rec in records for s in rec.get("stages", [])}
        record = {**records[0], "results": list(results.values()), "stages": list(stage_rows.values()),
                  "command": [c for rec in records for c in (rec["command"] + [";"])][:-1]}
        if options.record:
            write_section("plain_loop", render(record, options.note))
        return 0

    from pneumoedge.runtime.machine import cpu_info

    cpu = cpu_info()
    print(f"machine: {cpu.model}, {cpu.logical_cores} logical CPUs, SIMD: {cpu.flags_text}; load {load_average()}", flush=True)
    counts = sorted({int(c) for c in options.images.split(",")})
    folders = image_folders(counts)
    extra = options.infer_args.split()
    chosen = models(options.models)
    results, stage_rows = [], []
    for name, bundle in chosen:
        for count in [] if options.stages_only else counts:
            repeats = options.repeats if count <= 100 else options.large_repeats
            results.append(compare(name, bundle, folders[count], count, repeats, extra))
        if options.stages or options.stages_only:
            stage_rows.append(stages(name, bundle, folders[counts[0]]))
    record = {"machine": cpu.to_dict(), "counts": counts, "repeats": options.repeats, "large_repeats": options.large_repeats,
              "results": results, "stages": stage_rows,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": ["python", *sys.argv]}
    if options.json:
        options.json.write_text(json.dumps(record, indent=2) + "\n")
    if options.record:
        write_section("plain_loop", render(record, options.note))
    return 0


MARKERS = markers("plain_loop")


def render(record: dict, note: str) -> str:
    """The RESULTS.md section: machine and flags, protocol, plain loop vs infer, stage costs."""
    machine = record["machine"]
    lines = [
        MARKERS[0],
        "## Whole process: `pneumoedge infer` (defaults) vs the six-line onnxruntime loop",
        "",
        f"- **Date**: {record['created']}; **command**: `{' '.join(record['command'])}`",
        f"- **Machine**: {machine['cpu']}, {machine['logical_cores']} logical cores; **SIMD**: "
        f"{' '.join(machine['simd']) or 'no AVX2/VNNI/AMX'}; VNNI/AMX for int8: {'yes' if machine['fast_int8'] else '**no**'}",
        f"- **Conditions**: {note or 'not noted'}; load average (1, 5, 15 min) at each row's first run",
        f"- **Protocol**: synthetic X-ray-sized JPEGs (1024-1600 px a side); each side a fresh process; one warm-up each, "
        f"then {record['repeats']} alternating runs ({record.get('large_repeats', record['repeats'])} for folders over 100 "
        "images, warmed by reading their files); median [min-max] seconds. Plain loop: cv2.imread as the spec asks, "
        "cv2.resize, `InferenceSession.run` per image on the fp32 file(s), onnxruntime's default threads, no OOD, no output. "
        "`infer`: its defaults (configuration column), OOD score and CSV included. Zoo models are keras.applications "
        "backbones trained briefly on phantoms (benchmarks/zoo_build.py): demonstrations for speed, not classifiers.",
        "",
        "| model | images | plain loop wall s | `infer` wall s | infer / plain | plain CPU s | `infer` CPU s | load | `infer` configuration |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['model']} | {r['images']} | {r['plain_median_s']:.2f} [{r['plain_min_s']:.2f}-{r['plain_max_s']:.2f}] | "
            f"**{r['infer_median_s']:.2f}** [{r['infer_min_s']:.2f}-{r['infer_max_s']:.2f}] | {r['ratio']:.2f} | "
            f"{r['plain_cpu_median_s']:.2f} | {r['infer_cpu_median_s']:.2f} | {r['runs'][0]['load_average']} | {r['configuration']} |"
        )
    ratios = [r["ratio"] for r in record["results"]]
    cpu = [r["infer_cpu_median_s"] / r["plain_cpu_median_s"] for r in record["results"]]
    if ratios:
        lines += ["", f"`infer` / plain loop, wall: {min(ratios):.2f}-{max(ratios):.2f} over these rows "
                  f"({'never slower' if max(ratios) <= 1.0 else 'SLOWER in some rows'}). The plain loop's CPU seconds are "
                  f"about its wall seconds and `infer`'s are {min(cpu):.2f}-{max(cpu):.2f} of them (onnxruntime's default intra-op threads spin-wait between "
                  "runs; pneumoedge's sessions turn spinning off, `runtime.sessions.ALLOW_SPINNING`)."]
    if record.get("stages"):
        keys = ("decode", "preprocess", "model", "ood", "heatmap", "overlay", "row")
        lines += [
            "",
            "Where one image's milliseconds go (`pneumoedge bench`'s `stages_ms`: batch 1, medians of 10 runs on 6 of the "
            "images; - = the model has no such stage):",
            "",
            "| model | input (first member) | precision | " + " | ".join(keys) + " | load |",
            "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- |",
        ]
        for s in record["stages"]:
            cells = ["-" if s["stages_ms"].get(k) is None else f"{s['stages_ms'][k]:.2f}" for k in keys]
            lines.append(f"| {s['model']} | {s['input']} | {s['precision']} | " + " | ".join(cells) + f" | {s['load_average']} |")
    lines += ["", "Reproduce: `python benchmarks/plain_loop.py --models default,zoo --images 32,500 --stages --record`. "
              "This section is rewritten by that script only.", MARKERS[1]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
