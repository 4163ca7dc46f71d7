"""Scale-out: images/s of local `infer` vs `--engine ray` at 1 and 2 CPUs, Ray's fixed costs, and a capacity model.

    python benchmarks/scale_out.py                 # 2,000 small images, the default bundle
    python benchmarks/scale_out.py --images 400    # quicker

Each configuration runs in a fresh process (`run_folder` with a LocalEngine or a RayEngine on a
private local Ray), pinned to the first CPU when it is given one. Written to
benchmarks/scale_out.json; the markdown table goes to standard output.

The capacity model: a run of N images on C cores costs
    T(N, C) = start + first + N / min(C * r_core, bandwidth / bytes_per_image)
with `start` Ray's fixed start (0 locally), `first` the time to the first row (workers loading
the model; both measured, not modelled), `r_core` the images/s of one core, measured on Ray at 1 CPU, and the file-reading
bound from the folder's bytes per image (read bandwidth measured here from the page cache, so an
upper bound; a network share is far slower). The 2-CPU run checks the model's prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.results_md import markers, write_section  # noqa: E402
CONFIGS = [("local", 1), ("ray", 1), ("local", 2), ("ray", 2)]


def make_images(folder: Path, count: int, side: int = 256) -> int:
    """`count` smooth random gray JPEGs of side x side; returns their total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        small = rng.uniform(0, 255, size=(8, 8)).astype(np.float32)
        image = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
        data = cv2.imencode(".jpeg", image)[1].tobytes()
        (folder / f"img_{i:05d}.jpeg").write_bytes(data)
        total += len(data)
    return total


def read_bandwidth(folder: Path) -> float:
    """Bytes/s of reading every file once (from the page cache after make_images: an upper bound)."""
    start, total = time.perf_counter(), 0
    for path in sorted(folder.iterdir()):
        total += len(path.read_bytes())
    return total / (time.perf_counter() - start)


def _session_rss(sid: int) -> int:
    import psutil

    total = 0
    for process in psutil.process_iter(["memory_info"]):
        try:
            if os.getsid(process.pid) == sid and process.pid != os.getpid():
                total += process.info["memory_info"].rss
        except (psutil.Error, OSError):
            pass
    return total


def run_one(engine_name: str, cpus: int, folder: Path, out: Path) -> dict[str, Any]:
    """One measured run in this process (the parent starts a fresh one per configuration)."""
    if cpus < (os.cpu_count() or 1):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus]))  # Ray's processes inherit it
    from pneumoedge.runtime.folder import run_folder
    from pneumoedge.runtime.loading import default_bundle_path, load
    from pneumoedge.runtime.results import ResultWriter

    began = time.perf_counter()
    ensemble = load(None, threads=1)
    batch = ensemble.configuration.batch
    ray_peak = [0]
    if engine_name == "ray":
        from pneumoedge.runtime.ray_engine import RayEngine

        engine = RayEngine(default_bundle_path(), precision=ensemble.configuration.precision, batch_size=batch, local_cpus=cpus)
        start_s = engine.start_s
        sid = engine._local.process.pid if engine._local else None
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                ray_peak[0] = max(ray_peak[0], _session_rss(sid))

        threading.Thread(target=sample, daemon=True).start()
    else:
        engine, start_s, stop = ensemble, 0.0, None
    marks: dict[str, float] = {}

    def progress(rows: int, total: Optional[int], summary) -> None:
        if summary.predicted >= 1 and "first" not in marks:
            marks["first"] = time.perf_counter()
            marks["first_rows"] = summary.predicted

    writer = ResultWriter("jsonl", ensemble.labels, [m.name for m in ensemble.members])
    run_start = time.perf_counter()
    summary = run_folder(engine, [folder], writer=writer, out=out, overwrite=True, batch_size=batch, progress=progress)
    end = time.perf_counter()
    if stop is not None:
        stop.set()
    first_s = marks["first"] - run_start
    steady = (summary.predicted - 1) / (end - marks["first"]) if end > marks["first"] else 0.0
    return {
        "engine": engine_name, "cpus": cpus, "images": summary.predicted, "ok": summary.ok, "errors": summary.errors,
        "start_s": round(start_s, 2), "first_row_s": round(first_s, 2), "run_s": round(end - run_start, 2),
        "total_s": round(end - began, 2), "steady_images_per_s": round(steady, 1),
        "images_per_s": round(summary.predicted / (end - began), 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ray_processes_peak_rss_mb": round(ray_peak[0] / 2**20, 1) if engine_name == "ray" else None,
        "precision": ensemble.configuration.precision, "batch": batch,
    }


def capacity_model(runs: list[dict], bytes_per_image: float, bandwidth: float) -> dict[str, Any]:
    ray1 = next(r for r in runs if r["engine"] == "ray" and r["cpus"] == 1)
    ray2 = next(r for r in runs if r["engine"] == "ray" and r["cpus"] == 2)
    local1 = next(r for r in runs if r["engine"] == "local" and r["cpus"] == 1)
    local2 = next(r for r in runs if r["engine"] == "local" and r["cpus"] == 2)
    r_core = ray1["steady_images_per_s"]
    read_bound = bandwidth / bytes_per_image
    predicted_rate = min(2 * r_core, read_bound)
    predicted_run = ray2["start_s"] + ray2["first_row_s"] + ray2["images"] / predicted_rate  # fixed costs as measured
    return {
        "r_core_images_per_s": r_core,
        "read_bound_images_per_s": round(read_bound),
        "predicted_2cpu_images_per_s": round(predicted_rate, 1),
        "measured_2cpu_images_per_s": ray2["steady_images_per_s"],
        "rate_ratio_measured_over_predicted": round(ray2["steady_images_per_s"] / predicted_rate, 2),
        "predicted_2cpu_total_s": round(predicted_run, 1),
        "measured_2cpu_start_plus_run_s": round(ray2["start_s"] + ray2["run_s"], 1),
        "core_hours_per_million_images": round(1e6 / r_core / 3600, 1),
        # the same check on the local engine: does its second core double its rate?
        "local_predicted_2cpu_images_per_s": round(2 * local1["steady_images_per_s"], 1),
        "local_measured_2cpu_images_per_s": local2["steady_images_per_s"],
        "ray_steady_over_local_steady_2cpu": round(ray2["steady_images_per_s"] / local2["steady_images_per_s"], 2),
        "ray_fixed_cost_2cpu_s": round(ray2["start_s"] + ray2["first_row_s"] - local2["first_row_s"], 1),
    }


START, END = markers("scale_out")


def render_section(report: dict[str, Any]) -> str:
    """The RESULTS.md section of a report (between this script's markers)."""
    m, before, after = report["model"], report["machine_before"], report["machine_after"]
    lines = [
        START,
        "## Scale-out: `infer --engine ray` vs the local engine (`python benchmarks/scale_out.py`)",
        "",
        f"- **Date**: {report['date']}; **command**: `{report['command']}`; Ray {report['ray']}",
        f"- **Machine**: {before['cpu']}, {before['cores']} logical cores, flags: {', '.join(before['flags']) or 'none of avx2/avx512'}; "
        f"load average (1, 5, 15 min) before {before['load_average']}, after {after['load_average']}. "
        "The machine is shared by 7 engineers whose jobs were running: absolute figures are pessimistic and noisy; "
        "compare rows with each other, and rerun on a quiet machine before planning from them.",
        f"- **Setup**: {report['images']} images ({report['image']}, {report['bytes_per_image']} bytes each, page cache warm), "
        f"the default bundle ({report['runs'][0]['precision']} as chosen here, batch {report['runs'][0]['batch']}), one fresh process per row; "
        "1 CPU = the process (and the private local Ray it starts) pinned to one core; Ray = `RayEngine` on a private local Ray "
        "(what `--engine ray` without `--ray-address` starts), one worker (actor) per CPU.",
        "",
        "| engine | CPUs | Ray start s | first row s | run s | whole process s | steady images/s | driver peak RSS MB | Ray processes RSS MB (sum) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['engine']} | {r['cpus']} | {r['start_s'] if r['engine'] == 'ray' else '-'} | {r['first_row_s']} | {r['run_s']} | "
            f"{r['process_wall_s']} | {r['steady_images_per_s']} | {r['driver_peak_rss_mb']} | {r['ray_processes_peak_rss_mb'] or '-'} |"
        )
    lines += [
        "",
        "**Capacity model** (T = start + first + N / min(C x r_core, read bound)): "
        f"r_core = {m['r_core_images_per_s']} images/s (Ray, 1 CPU, steady); read bound {m['read_bound_images_per_s']} images/s "
        f"({report['read_bandwidth_mb_s_page_cache']} MB/s from the page cache: an upper bound, a network share is far lower). "
        f"Predicted at 2 CPUs: {m['predicted_2cpu_images_per_s']} images/s, measured {m['measured_2cpu_images_per_s']} "
        f"(ratio {m['rate_ratio_measured_over_predicted']}); whole run predicted {m['predicted_2cpu_total_s']} s, "
        f"measured {m['measured_2cpu_start_plus_run_s']} s. The local engine's second core: predicted "
        f"{m['local_predicted_2cpu_images_per_s']}, measured {m['local_measured_2cpu_images_per_s']} images/s. "
        f"{'The model holds here' if m['rate_ratio_measured_over_predicted'] >= 0.8 else 'The model is NOT confirmed on this machine: a second core did not double either engine, because the jobs of other engineers took their share of it (see the load average); a quiet multi-core machine is needed to check linear scaling'}. "
        f"At 2 CPUs Ray's steady rate is {m['ray_steady_over_local_steady_2cpu']}x the local engine's, and Ray adds a fixed "
        f"{m['ray_fixed_cost_2cpu_s']} s (start + first row) per run. At the 1-CPU Ray rate, a million of these images "
        f"take about {m['core_hours_per_million_images']} core-hours.",
        "",
        *([f"**Note on this run**: {report['note']}", ""] if report.get("note") else []),
        "Ray's fixed cost is the start (a private local Ray: a helper process starts it, the driver connects) plus the first "
        "row (each worker process starts and loads the bundle, verifying its checksums); joining a running cluster skips "
        "most of the start. RSS of Ray's processes is a sum over processes and counts shared pages more than once. "
        "See docs/scale.md for when the Ray engine pays off.",
        "",
        "Reproduce: `python benchmarks/scale_out.py` (needs the `[ray]` extra); `--render benchmarks/scale_out.json` rewrites "
        "this section from the last measurement. This section is rewritten by that script only.",
        END,
    ]
    return "\n".join(lines) + "\n"


def record(report: dict[str, Any]) -> None:
    write_section("scale_out", render_section(report))


def machine() -> dict[str, Any]:
    flags = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = {f for f in ("avx2", "avx512_vnni", "avx512f", "amx_tile") if f" {f}" in text}
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "flags": sorted(flags), "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE / "scale_out.json")
    parser.add_argument("--note", default="", help="a remark recorded with the figures (e.g. what else ran)")
    parser.add_argument("--render", type=Path, help="rewrite the RESULTS.md section from this JSON report; run nothing")
    parser.add_argument("--one", nargs=4, metavar=("ENGINE", "CPUS", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        engine, cpus, folder, out = args.one
        print(json.dumps(run_one(engine, int(cpus), Path(folder), Path(out))))
        return
    if args.render:
        record(json.loads(args.render.read_text()))
        return
    import ray

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        folder = Path(tmp) / "images"
        total_bytes = make_images(folder, args.images)
        bandwidth = read_bandwidth(folder)
        before = machine()
        runs = []
        for engine, cpus in CONFIGS:
            command = [sys.executable, __file__, "--one", engine, str(cpus), str(folder), str(Path(tmp) / f"{engine}{cpus}.jsonl")]
            started = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            run = json.loads(result.stdout.strip().splitlines()[-1])
            run["process_wall_s"] = round(time.perf_counter() - started, 2)
            run["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            runs.append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    report = {
        "date": started_at, "command": "python benchmarks/scale_out.py" + (f" --images {args.images}" if args.images != 2000 else ""),
        "note": args.note, "images": args.images, "image": "256x256 gray JPEG", "bytes_per_image": round(total_bytes / args.images),
        "read_bandwidth_mb_s_page_cache": round(bandwidth / 2**20), "ray": ray.__version__,
        "machine_before": before, "machine_after": machine(), "runs": runs,
        "model": capacity_model(runs, total_bytes / args.images, bandwidth),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.out == HERE / "scale_out.json":
        record(report)
    print("| engine | CPUs | start s | first row s | run s | whole process s | steady images/s | driver RSS MB | Ray RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['engine']} | {r['cpus']} | {r['start_s']} | {r['first_row_s']} | {r['run_s']} | {r['process_wall_s']} | "
              f"{r['steady_images_per_s']} | {r['driver_peak_rss_mb']} | {r['ray_processes_peak_rss_mb'] or '-'} |")
    print(json.dumps(report["model"], indent=2))


if __name__ == "__main__":
    main()
