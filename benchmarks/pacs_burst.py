"""The DICOM node under a burst from a real Orthanc: instances/s received and classified, push-to-SR latency.

    python -m benchmarks.pacs_burst                      # 200 instances at 1024 px, 16-bit DX
    python -m benchmarks.pacs_burst --count 50 --size 512 --no-record

Starts Orthanc (Debian's `orthanc`) as a plain process in a temporary folder and
`pneumoedge listen --send-to ORTHANC@...` as a real subprocess, then measures:
- isolated latency: one instance pushed at a time (`POST /modalities/PE/store`, synchronous),
  from the push request to its SR being listed by Orthanc (polling `/changes` every 20 ms);
- a burst: all instances in one push request; received/s = count / push duration; classified/s
  = count / time until the last result row; per-instance latency from the burst's start and
  from the instance's arrival at pneumoedge (the row's `received`) to its SR being visible.
Images are synthetic phantoms (not patients). Writes benchmarks/pacs_burst.json and a section
of benchmarks/RESULTS.md between markers (replaced on each run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results_md import markers, write_section  # noqa: E402

from tests.orthanc_helpers import HOST, Orthanc, chest_instance, free_port  # noqa: E402

START, END = markers("pacs_burst")


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    named = sorted(f for f in flags if f in ("avx2", "fma", "avx512f") or "vnni" in f or f.startswith("amx"))
    return {"model": model, "flags": named, "logical_cores": os.cpu_count()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class ChangeWatcher(threading.Thread):
    """Polls Orthanc's /changes; records when each new instance was first listed (local clock)."""

    def __init__(self, orthanc: Orthanc, interval: float) -> None:
        super().__init__(daemon=True)
        self.orthanc, self.interval = orthanc, interval
        self.seen: dict[str, float] = {}
        self.since = orthanc.get("/changes?last")["Last"]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                answer = self.orthanc.get(f"/changes?since={self.since}&limit=1000")
            except OSError:  # Orthanc's HTTP server resets a connection now and then under polling
                time.sleep(self.interval)
                continue
            now = time.time()
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.seen.setdefault(change["ID"], now)
            self.since = answer["Last"]
            if answer["Done"]:
                time.sleep(self.interval)


def sr_times(orthanc: Orthanc, watcher: ChangeWatcher) -> dict[str, float]:
    """SR SOP Instance UID -> time first listed."""
    found = {}
    for orthanc_id, seen in list(watcher.seen.items()):
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        if tags.get("Modality") == "SR":
            found[tags["SOPInstanceUID"]] = seen
    return found


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances in the burst")
    parser.add_argument("--isolated", type=int, default=20, help="single pushes for the isolated latency")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (16-bit DX)")
    parser.add_argument("--listen-args", default="", help="extra arguments for pneumoedge listen, e.g. '--batch 16'")
    parser.add_argument("--note", default="", help="conditions to record (e.g. other jobs running)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write RESULTS.md / pacs_burst.json")
    options = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pneumoedge-pacs-burst-"))
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    listener = None
    load_start = os.getloadavg()
    try:
        port = free_port()
        orthanc.add_modality("PE", "PNEUMOEDGE", port)
        print(f"generating {options.count + options.isolated} phantom instances of {options.size} px ...", file=sys.stderr)
        isolated = [orthanc.upload(chest_instance(size=options.size, sixteen_bit=True, seed=i)) for i in range(options.isolated)]
        study = f"2.25.{int(time.time() * 1e6)}"
        burst = [
            orthanc.upload(chest_instance(size=options.size, sixteen_bit=True, seed=1000 + i, study_uid=study))
            for i in range(options.count)
        ]
        out = work / "node"
        command = ["pneumoedge", "listen", "--out", str(out), "--host", HOST, "--port", str(port),
                   "--send-to", f"{orthanc.aet}@{HOST}:{orthanc.dicom_port}", *options.listen_args.split()]
        log = open(work / "listen.log", "wb")
        listener = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL)
        while b"listening as" not in (work / "listen.log").read_bytes():
            if listener.poll() is not None:
                raise SystemExit(f"listener exited: {(work / 'listen.log').read_text()}")
            time.sleep(0.1)
        results = out / "results.jsonl"
        watcher = ChangeWatcher(orthanc, 0.02)
        watcher.start()
        single = []
        for index, instance in enumerate(isolated):
            before = len(watcher.seen)
            started = time.time()
            orthanc.push("PE", [instance])
            while len(rows(results)) < index + 1 or len(watcher.seen) <= before:
                time.sleep(0.005)
            single.append(max(watcher.seen.values()) - started)
        print(f"isolated push-to-SR p50 {statistics.median(single):.3f} s", file=sys.stderr)
        base = len(rows(results))
        row_times: list[float] = []
        counter = threading.Event()

        def count_rows() -> None:
            while not counter.is_set():
                n = len(rows(results)) - base
                while len(row_times) < n:
                    row_times.append(time.time())
                if n >= options.count:
                    return
                time.sleep(0.02)

        counting = threading.Thread(target=count_rows, daemon=True)
        burst_start = time.time()
        counting.start()
        orthanc.push("PE", burst)
        pushed = time.time() - burst_start
        counting.join(600)
        classified = row_times[-1] - burst_start
        deadline = time.time() + 300
        burst_rows = rows(results)[base:]
        while time.time() < deadline:
            srs = sr_times(orthanc, watcher)
            if all(r["sr"] in srs for r in burst_rows):
                break
            time.sleep(0.5)
        watcher.done.set()
        from_start = [srs[r["sr"]] - burst_start for r in burst_rows]
        from_arrival = [srs[r["sr"]] - dt.datetime.fromisoformat(r["received"]).timestamp() for r in burst_rows]
    finally:
        if listener is not None and listener.poll() is None:
            listener.send_signal(signal.SIGTERM)
            listener.wait(60)
        orthanc.stop()
    summary = next((l for l in (work / "listen.log").read_text().splitlines()[::-1] if "pneumoedge listen:" in l), "")
    split = re.search(r"classifying ([\d.]+) s, building result objects ([\d.]+) s", summary)
    figures = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.pacs_burst " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": cpu(),
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "note": options.note,
        "orthanc": "Orthanc 1.10 (Debian)",
        "image": f"{options.size}x{options.size} 16-bit (12 bits stored) DX, explicit VR little endian, synthetic phantoms",
        "count": options.count,
        "listen_args": options.listen_args,
        "received_per_s": options.count / pushed,
        "classified_per_s": options.count / classified,
        "push_s": pushed,
        "last_row_s": classified,
        "isolated_latency_s": {"p50": statistics.median(single), "p95": percentile(single, 95), "n": len(single)},
        "burst_latency_from_start_s": {"p50": statistics.median(from_start), "p95": percentile(from_start, 95), "max": max(from_start)},
        "node_classify_s": float(split[1]) if split else None,
        "node_report_s": float(split[2]) if split else None,
        "instances_total": options.count + options.isolated,
        "burst_latency_from_arrival_s": {"p50": statistics.median(from_arrival), "p95": percentile(from_arrival, 95)},
    }
    print(json.dumps(figures, indent=2))
    if not options.no_record:
        (ROOT / "benchmarks" / "pacs_burst.json").write_text(json.dumps(figures, indent=2) + "\n")
        record(figures)
    return 0


def _ms(total: float | None, count: int) -> str:
    return "n/a" if total is None else f"{1000 * total / count:.0f} ms"


def record(f: dict) -> None:
    m = f["machine"]
    section = "\n".join([
        START,
        "## DICOM node: a burst from Orthanc (`pneumoedge listen`)",
        "",
        f"- **Date**: {f['date']}; **command**: `{f['command'].strip()}`",
        f"- **Machine**: {m['model']}, {m['logical_cores']} logical cores, SIMD flags: {', '.join(m['flags']) or 'none named'}; "
        f"load average (1, 5, 15 min) at start {[round(x, 2) for x in f['load_average_start_end'][0]]}, "
        f"at end {[round(x, 2) for x in f['load_average_start_end'][1]]}" + (f"; {f['note']}" if f['note'] else ""),
        f"- **Setup**: {f['orthanc']} and the node on the same machine (127.0.0.1); default bundle, `--precision auto` (fp32 on this CPU); "
        f"`listen` options: {f['listen_args'] or 'defaults'}; {f['count']} instances of {f['image']} in one push request "
        "(Orthanc pushes over one association, one instance at a time); SR visibility polled on Orthanc's `/changes` every 20 ms.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| received (Orthanc push of {f['count']}, acknowledged after fsync) | {f['received_per_s']:.1f} instances/s ({f['push_s']:.2f} s) |",
        f"| classified (last result row, from the push's start) | {f['classified_per_s']:.1f} instances/s ({f['last_row_s']:.2f} s) |",
        f"| push-to-SR-visible, one instance at a time (n={f['isolated_latency_s']['n']}) | p50 {f['isolated_latency_s']['p50']:.2f} s, p95 {f['isolated_latency_s']['p95']:.2f} s |",
        f"| push-to-SR-visible in the burst, from the burst's start | p50 {f['burst_latency_from_start_s']['p50']:.2f} s, p95 {f['burst_latency_from_start_s']['p95']:.2f} s, last {f['burst_latency_from_start_s']['max']:.2f} s |",
        f"| in the burst, from the instance's arrival at pneumoedge | p50 {f['burst_latency_from_arrival_s']['p50']:.2f} s, p95 {f['burst_latency_from_arrival_s']['p95']:.2f} s |",
        f"| the node's own time over all {f['instances_total']} instances: decode + models / building SR objects (highdicom), in two threads that overlap | "
        f"{_ms(f['node_classify_s'], f['instances_total'])} / {_ms(f['node_report_s'], f['instances_total'])} per instance |",
        "",
        "Reproduce: `python -m benchmarks.pacs_burst` (needs Debian's `orthanc`). This section is rewritten by that script only;"
        " `benchmarks/compare.py` regenerates the rest of this file.",
        END,
        "",
    ])
    write_section("pacs_burst", section)


if __name__ == "__main__":
    raise SystemExit(main())
