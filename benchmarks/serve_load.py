"""`pneumoedge serve` under load and under faults, on loopback, against `pneumoedge infer` on the same files.

    python benchmarks/serve_load.py                    # 16 clients for 30 s, then the faults; prints markdown
    python benchmarks/serve_load.py --record           # also writes the section into benchmarks/RESULTS.md

Load: CLIENTS concurrent clients post the example JPEGs (1-2 Mpx phantoms, round robin) as
multipart for DURATION seconds; requests/s, latency percentiles, errors, the server's RSS over
time, and /healthz latency during the load. Baseline: `pneumoedge infer` images/s over a folder
of the same JPEGs. Faults, each followed by a normal request that must succeed: client
disconnects mid-upload, a 2 GB Content-Length with a trickle body, malformed multipart,
100 requests at once beside stalled uploads (which hold connections, not queue slots), a
corrupted DICOM. Clients and server share this machine's cores (stated in the output).
Bounded: one server, loopback only, about DURATION + 30 s in all.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import io
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results_md import markers, write_section  # noqa: E402
EXAMPLES = ROOT / "examples" / "images"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = markers("serve_load")
BOUNDARY = "pneumoedgeloadboundary"


def machine() -> str:
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), platform.processor() or "unknown CPU")
    flags = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"))
    cores = f"{psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical cores"
    return f"{model}; {cores}; {shown}; {platform.platform()}, Python {platform.python_version()}"


def multipart(name: str, data: bytes) -> bytes:
    """One file as a multipart body, built once (the clients must not spend the CPU the server needs)."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def infer_baseline(images: list[Path], copies: int, work: Path) -> tuple[float, int, float]:
    """`pneumoedge infer` images/s (its own summary: model loaded, files read, decoded, classified)."""
    folder = work / "infer"
    if not folder.exists():
        folder.mkdir()
        for i in range(copies):
            for image in images:
                os.symlink(image, folder / f"{i:03d}_{image.name}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", "pneumoedge", "infer", str(folder), "--out", str(work / "infer.jsonl"), "--overwrite", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    match = re.search(r"([0-9.]+) images/s", done.stderr)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"infer failed ({done.returncode}): {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return float(match.group(1)), len(images) * copies, cpu / (len(images) * copies)


def start_server(port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumoedge", "serve", "--port", str(port)],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve exited: {log.read_text(errors='replace')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("serve did not become ready in 60 s")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss / 2**20))
            except psutil.Error:
                return
            self.stopping.wait(0.5)


def load(port: int, bodies: list[bytes], clients: int, duration: float) -> dict:
    """`clients` threads, each one keep-alive connection (stdlib http.client: a light client, so the
    cores go to the server; httpx cost 12 ms of CPU per request here), posting until `duration`."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    health: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + duration
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = index
        while time.monotonic() < end:
            body = bodies[n % len(bodies)]
            n += clients
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/v1/predict", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                key = str(response.status)
                if response.status == 200 and json.loads(payload)["results"][0]["status"] != "ok":
                    key = "200 with an error row"
            except (OSError, http.client.HTTPException) as exc:
                key = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                latencies.append(time.perf_counter() - started)
                statuses[key] = statuses.get(key, 0) + 1
        connection.close()

    def prober() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < end:
            started = time.perf_counter()
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            health.append(time.perf_counter() - started)
            time.sleep(0.25)
        connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=prober)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"elapsed": time.monotonic() - started, "latencies": latencies, "statuses": statuses, "health": health}


def raw_request(port: int, head: str, body: bytes = b"", *, read: bool = True, timeout: float = 10) -> tuple[Optional[int], float]:
    """Send bytes on a fresh socket; the status line's code (None: no answer) and seconds to it."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        if not read:
            return None, 0.0
        try:
            line = sock.recv(64)
        except OSError:
            return None, time.perf_counter() - started
    match = re.match(rb"HTTP/1\.1 (\d{3})", line)
    return (int(match.group(1)) if match else None), time.perf_counter() - started


def ok(url: str, body: bytes) -> bool:
    response = httpx.post(f"{url}/api/v1/predict", content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=30)
    return response.status_code == 200 and response.json()["results"][0]["status"] == "ok"


def post_head(port: int, length: int, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> str:
    return f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"


def faults(url: str, port: int, body: bytes, queue_limit: int) -> list[tuple[str, str, bool]]:
    """Each fault, what the server answered, and whether the next normal request succeeded."""
    rows = []
    # 1. Clients that vanish mid-upload (5 of them).
    for _ in range(5):
        raw_request(port, post_head(port, len(body)), body[: len(body) // 3], read=False)
    time.sleep(0.5)
    rows.append(("5 clients disconnect a third of the way into an upload", "connections dropped, nothing to answer", ok(url, body)))
    # 2. A 2 GB Content-Length with a trickle body: refused from the header, before any byte is read.
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(post_head(port, 2_000_000_000, "image/jpeg").encode())
        answer = b""
        for _ in range(20):  # trickle one byte every 0.1 s until the server answers
            try:
                sock.sendall(b"\xff")
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                answer += sock.recv(256)
            except socket.timeout:
                continue
            if answer:
                break
    code = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    rows.append((
        "2 GB Content-Length, body trickled 1 byte / 0.1 s",
        f"{code.group(1).decode() if code else 'no answer'} after {1000 * (time.perf_counter() - started):.0f} ms",
        ok(url, body),
    ))
    # 3. Malformed multipart.
    broken = httpx.post(f"{url}/api/v1/predict", content=b"--x\r\nno headers, no end", headers={"Content-Type": "multipart/form-data; boundary=x"})
    rows.append(("malformed multipart", f"{broken.status_code}: {broken.json()['detail'][:60]}", ok(url, body)))
    # 4. As many stalled uploads as queue slots (since issue 19 they hold no slot: a slot is taken
    #    only once a body is read), then 100 requests at once (past --max-connections: 503), then recovery.
    stalled = []
    for _ in range(queue_limit):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(post_head(port, len(body)).encode() + body[:1000])
        stalled.append(sock)
    time.sleep(0.5)

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=30) as session:
            answers = await asyncio.gather(*(session.post(f"{url}/api/v1/predict", content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}) for _ in range(100)))
        return [(a.status_code, a.headers.get("retry-after", "")) for a in answers]

    answers = asyncio.run(burst())
    codes = {}
    for code_, _ in answers:
        codes[code_] = codes.get(code_, 0) + 1
    retry = {r for c, r in answers if c == 503}
    for sock in stalled:
        sock.close()
    time.sleep(0.5)
    recovered = all(ok(url, body) for _ in range(10))
    rows.append((
        f"{queue_limit} stalled uploads (holding connections, not slots), then 100 requests",
        ", ".join(f"{n} x {c}" for c, n in sorted(codes.items())) + f" (Retry-After {', '.join(sorted(retry)) or '-'})",
        recovered,
    ))
    # 5. A corrupted DICOM (pixel data cut short, header intact).
    dicom = corrupted_dicom()
    if dicom is None:
        rows.append(("corrupted DICOM", "skipped: pydicom is not installed ([dicom] extra)", ok(url, body)))
    else:
        answer = httpx.post(f"{url}/api/v1/predict", content=dicom, headers={"Content-Type": "application/dicom"})
        reason = answer.json()["results"][0]["error"][:70] if answer.status_code != 200 else "classified"
        rows.append(("corrupted DICOM (pixel data cut short)", f"{answer.status_code}: {reason}", ok(url, body)))
    return rows


def corrupted_dicom() -> Optional[bytes]:
    try:
        import cv2
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    except ImportError:
        return None
    pixels = cv2.imread(str(EXAMPLES / "example_01.jpeg"), cv2.IMREAD_GRAYSCALE)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CR", "Load^Test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    return data[: len(data) // 2]


def cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU seconds of process `pid` (None: this process, the clients)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def report(args, base_rates: list[float], base_n: int, result: dict, rss: list[tuple[float, float]], fault_rows, alive: bool) -> str:
    lat = [1000 * v for v in result["latencies"]]
    ok_count = result["statuses"].get("200", 0)
    rate = ok_count / result["elapsed"]
    errors = sum(n for k, n in result["statuses"].items() if k != "200")
    values = [v for t, v in rss if result["load_start"] <= t <= result["load_end"]]
    quarter = max(1, len(values) // 4)
    peaks = [max(values[i * quarter:(i + 1) * quarter] or [float("nan")]) for i in range(4)]
    health = [1000 * v for v in result["health"]]
    base_rate = sum(base_rates) / len(base_rates)
    lines = [
        START,
        "## Web service (`pneumoedge serve`) under load and faults",
        "",
        f"- **Date**: {datetime.now(timezone.utc).isoformat(timespec='seconds')} (UTC); command: `python benchmarks/serve_load.py --clients {args.clients} --duration {args.duration:g}{' --record' if args.record else ''}`",
        f"- **Machine**: {machine()}",
        f"- **Conditions**: load average at start {args.loadavg_start}, at end {[round(v, 2) for v in os.getloadavg()]}; "
        f"the {args.clients} clients (threads of one process, stdlib http.client, keep-alive, bodies encoded once) share the cores with the server; server defaults "
        f"(default bundle; {args.server_config}; queue 32, 64 MB limit)",
        f"- **Files**: the {len(args.images)} example JPEGs ({', '.join(p.name for p in args.images)}; 1-2 Mpx synthetic phantoms), round robin",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| requests answered 200 with a result | {ok_count} in {result['elapsed']:.1f} s = **{rate:.1f} requests/s** (one image each) |",
        f"| `pneumoedge infer` on the same JPEGs ({base_n} files, symlinks), before / after the load | "
        f"{' / '.join(f'{r:.1f}' for r in base_rates)} images/s (its own summary), mean {base_rate:.1f} |",
        f"| serve / infer (mean) | **{100 * rate / base_rate:.0f} %** (target >= 80 %) |",
        f"| CPU per answered request: server / the clients | {1000 * result['server_cpu'] / max(ok_count, 1):.1f} / "
        f"{1000 * result['client_cpu'] / max(ok_count, 1):.1f} ms (the clients run on the same cores); "
        f"`infer`: {1000 * args.infer_cpu:.1f} ms per image (whole process, start included) |",
        f"| latency p50 / p95 / p99 / max | {percentile(lat, 50):.0f} / {percentile(lat, 95):.0f} / {percentile(lat, 99):.0f} / {max(lat):.0f} ms |",
        f"| errors | {errors} ({', '.join(f'{k}: {n}' for k, n in sorted(result['statuses'].items()))}) |",
        f"| `/healthz` during the load, p50 / max ({len(health)} probes) | {percentile(health, 50):.1f} / {max(health):.1f} ms |",
        f"| server RSS during the load: first sample / peak of each quarter / last sample | {values[0]:.0f} / "
        f"{' / '.join(f'{p:.0f}' for p in peaks)} / {values[-1]:.0f} MiB (after the faults: {rss[-1][1]:.0f} MiB) |",
        "",
        "| fault | server's answer | next normal request ok |",
        "| --- | --- | --- |",
        *[f"| {name} | {answer} | {'yes' if good else '**no**'} |" for name, answer, good in fault_rows],
        "",
        f"Server process alive after everything: {'yes' if alive else '**no**'}.",
        END,
    ]
    return "\n".join(lines) + "\n"


def record(section: str) -> None:
    write_section("serve_load", section)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (at least 30 for the record)")
    parser.add_argument("--infer-copies", type=int, default=30, help="copies of each JPEG in infer's folder")
    parser.add_argument("--record", action="store_true", help=f"write the section into {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.images = sorted(EXAMPLES.glob("*.jpeg"))
    args.loadavg_start = [round(v, 2) for v in os.getloadavg()]
    bodies = [multipart(p.name, p.read_bytes()) for p in args.images]
    with tempfile.TemporaryDirectory(prefix="pneumoedge-serve-load-") as tmp:
        work = Path(tmp)
        print("infer baseline ...", file=sys.stderr)
        first_rate, base_n, infer_cpu = infer_baseline(args.images, args.infer_copies, work)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = start_server(port, work / "serve.log")
        sampler = RssSampler(server.pid)
        try:
            sampler.start()
            for body in bodies:  # warm-up: first runs allocate
                ok(url, body)
            print(f"load: {args.clients} clients for {args.duration:g} s ...", file=sys.stderr)
            server_cpu, client_cpu = cpu_seconds(server.pid), cpu_seconds(None)
            load_start = time.monotonic()
            result = load(port, bodies, args.clients, args.duration)
            result["load_start"], result["load_end"] = load_start, time.monotonic()
            result["server_cpu"] = cpu_seconds(server.pid) - server_cpu
            result["client_cpu"] = cpu_seconds(None) - client_cpu
            print("faults ...", file=sys.stderr)
            fault_rows = faults(url, port, bodies[0], 32)
            final = load(port, bodies, 8, 3.0)
            fault_rows.append(("afterwards: 8 clients for 3 s", ", ".join(f"{n} x {k}" for k, n in sorted(final["statuses"].items())), set(final["statuses"]) == {"200"}))
            alive = server.poll() is None
        finally:
            sampler.stopping.set()
            sampler.join(2)
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(15)
                except subprocess.TimeoutExpired:
                    server.kill()
            log = (work / "serve.log").read_text(errors="replace")
        print("infer baseline again ...", file=sys.stderr)
        last_rate, _, _ = infer_baseline(args.images, args.infer_copies, work)
    args.infer_cpu = infer_cpu
    args.server_config = next((line.strip() for line in log.splitlines() if line.startswith("model runs:")), "configuration not printed")
    section = report(args, [first_rate, last_rate], base_n, result, sampler.samples, fault_rows, alive)
    print(section)
    leaked = [name for name in ("example_0", "Load^Test", ".jpeg") if name in log]
    if leaked:
        print(f"WARNING: the server log holds {leaked}", file=sys.stderr)
    if args.record:
        record(section)
        print(f"recorded in {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
