"""`infer --engine ray`: the local engine's rows on Ray, failures as rows, loopback only, nothing left running.

One two-node `ray.cluster_utils.Cluster` on 127.0.0.1 is shared by the module (Ray starts in
6-15 s); two tests start the CLI's own private local Ray, as a user would. Outside CI the
module skips, with the reason, when Ray is missing; in CI (PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS=1)
a missing Ray fails.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest

from pneumoedge.bundle import MemberSource, write_bundle
from pneumoedge.runtime.ray_engine import LOOPBACK_ENV
from tests.conftest import SPEC_GRAY, SPEC_RGB, gradient_image
from tests.onnx_models import mean_model

ROOT = Path(__file__).resolve().parent.parent

if importlib.util.find_spec("ray") is None:
    _reason = 'Ray is not installed (pip install "pneumoedge[ray]")'
    if os.environ.get("PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(f"{_reason}; PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS=1 forbids skipping", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

psutil = pytest.importorskip("psutil")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_env():
    """Loopback and a token for everything Ray in this module (set before Ray is imported)."""
    env = {**LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def cluster(ray_env, tmp_path_factory):
    """Two Ray nodes of one CPU each on this machine, 127.0.0.1 only."""
    import ray
    from ray.cluster_utils import Cluster

    from ray._common.utils import get_default_ray_temp_dir, reset_ray_address

    temp = tempfile_short()
    # Cluster writes the head's address into the default temp folder (/tmp/ray) without creating it.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    args = {"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1", "temp_dir": temp}
    nodes = Cluster(initialize_head=True, head_node_args=args)
    nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=temp)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()
    reset_ray_address()
    shutil.rmtree(temp, ignore_errors=True)


def tempfile_short() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="pe-ray-t-")  # Ray's socket paths must stay under 107 bytes


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The conftest's two-member bundle (gray 32x32 + rgb 24x40), module-wide."""
    root = tmp_path_factory.mktemp("ray-bundle")
    write_bundle(
        root / "bundle",
        [
            MemberSource(mean_model(root / "gray.onnx", SPEC_GRAY, a=(4.0,), b=(-2.0,)), "gray", SPEC_GRAY, weight=1.0),
            MemberSource(mean_model(root / "rgb.onnx", SPEC_RGB, a=(-3.0,), b=(1.0,)), "rgb", SPEC_RGB, weight=3.0),
        ],
        labels=("NORMAL", "PNEUMONIA"), threshold=0.4, threshold_method="test", provenance={"synthetic": True}, name="test-bundle",
    )
    return root / "bundle"


def _images(folder: Path, count: int, size: tuple[int, int] = (96, 80)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"img_{i:04d}.png"), gradient_image(*size, i))
    return folder


def _infer(*args: str, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pneumoedge", "infer", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _rows(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "one row per file"
    return by_path


def _assert_same_rows(ray_rows: dict[str, dict], local_rows: dict[str, dict]) -> None:
    assert sorted(ray_rows) == sorted(local_rows)
    for path, local in local_rows.items():
        ours = ray_rows[path]
        assert set(ours) == set(local), path
        for key, value in local.items():
            if key in ("probability", "disagreement", "ood_score") and value is not None:
                assert ours[key] == pytest.approx(value, abs=1e-6), (path, key)
            elif key in ("probabilities", "member_probabilities"):
                assert json.dumps(ours[key], sort_keys=True) == json.dumps(value, sort_keys=True) or _close(ours[key], value), (path, key)
            else:
                assert ours[key] == value, (path, key)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return abs(a - b) <= 1e-6


def _loopback_only(processes) -> list:
    """Every inet socket of `processes` (listening, UDP, connected: both ends) is on loopback."""
    pids = {p.pid for p in processes}
    sockets = [c for c in psutil.net_connections("inet") if c.pid in pids]
    for conn in sockets:
        for address in (conn.laddr, conn.raddr):
            if address:
                host = address.ip.removeprefix("::ffff:")
                assert ipaddress.ip_address(host).is_loopback, f"{psutil.Process(conn.pid).name()}: {conn}"
    listening = [c for c in sockets if c.status == psutil.CONN_LISTEN]
    assert listening, "no listening socket found: the check saw nothing"
    return listening


def _ray_children() -> list:
    """This test process's descendants that belong to Ray (other fixtures' servers, such as the
    PACS tests' Orthanc, may still be running and are not Ray's to judge)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "ray" in cmdline.lower() or "gcs_server" in cmdline or "raylet" in cmdline:
            found.append(process)
    return found


def _private_ray_processes() -> list:
    """Processes of a private local Ray of the CLI (their command lines name its pe-ray- folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "/pe-ray-" in cmdline and "pe-ray-t-" not in cmdline and process.pid != os.getpid():
            found.append(process)
    return found


# -- sabotage for the failure tests (pickled by value: workers need not import tests/) ----------


class _Sabotaged:
    """An Ensemble whose worker process dies on files named crash*, and hangs on hang*."""

    def __init__(self, ensemble) -> None:
        self.ensemble = ensemble

    def predict_many(self, paths, **kwargs):
        for path in paths:
            name = Path(path).name
            if name.startswith("crash"):
                os._exit(7)  # as a segfaulting decoder would: no exception, the process is gone
            if name.startswith("hang"):
                time.sleep(3600)  # as a read from a dead network share would
        return self.ensemble.predict_many(paths, **kwargs)


def _sabotaged_loader(bundle_path: str):
    import pneumoedge

    return _Sabotaged(pneumoedge.load(bundle_path, precision="fp32", threads=1))


# -- tests ------------------------------------------------------------------------------------


def test_rows_equal_the_local_engine_on_a_hostile_folder_on_two_nodes(cluster, bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.test_inputs import _hostile_folder

    root = tmp_path / "hostile in"
    _hostile_folder(root)
    _images(root / "more", 12)
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    local = _infer(str(root), "-m", str(bundle), "-o", str(local_out))
    ours = _infer(str(root), "-m", str(bundle), "-o", str(ray_out), "--engine", "ray", "--ray-address", cluster.address, "--batch", "2")
    assert ours.returncode == local.returncode == 1, ours.stderr  # the hostile files are error rows
    assert "Traceback" not in ours.stderr and "ray: 2 workers x 1 CPU" in ours.stderr
    _assert_same_rows(_rows(ray_out), _rows(local_out))


def test_two_nodes_share_the_work_and_crashes_and_hangs_become_rows(cluster, ray_env, bundle: Path, tmp_path: Path) -> None:
    import ray

    import pneumoedge
    from pneumoedge.runtime.ray_engine import RayEngine

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    folder = _images(tmp_path / "in", 10)
    for name in ("crash.png", "hang.png"):
        cv2.imwrite(str(folder / name), gradient_image(50, 50, 99))
    paths = sorted(folder.iterdir())
    engine = RayEngine(
        bundle, address=cluster.address, batch_size=2, timeout_s=4, max_deaths=1,
        loader=functools.partial(_sabotaged_loader, str(bundle)),
    )
    try:
        assert engine.workers == 2 and len(ray.nodes()) == 2
        _loopback_only(_ray_children())  # GCS, raylets, workers, agents
        rows = {p.source: p for p in engine.predict(paths)}
    finally:
        engine.close()
    assert sorted(rows) == sorted(str(p) for p in paths), "one row per file, nothing dropped"
    crash, hang = rows[str(folder / "crash.png")], rows[str(folder / "hang.png")]
    assert crash.status == "error" and "worker process died 1 times" in crash.error, crash
    assert hang.status == "error" and "no result within 4 s" in hang.error, hang
    local = pneumoedge.load(bundle, precision="fp32", threads=1)
    good = [p for p in paths if p.name.startswith("img")]
    for expected in local.predict_many(good):
        assert rows[expected.source].status == "ok"
        assert rows[expected.source].probability == pytest.approx(expected.probability, abs=1e-6)
    assert len(engine.rows_per_node) == 2, f"both nodes predicted: {dict(engine.rows_per_node)}"


def test_a_killed_worker_is_replaced_and_every_file_gets_its_row(cluster, ray_env, bundle: Path, tmp_path: Path) -> None:
    from pneumoedge.runtime.ray_engine import RayEngine

    folder = _images(tmp_path / "in", 60, size=(600, 500))
    paths = sorted(folder.iterdir())
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for process in psutil.Process().children(recursive=True):
                try:
                    if "PneumoedgeWorker" in " ".join(process.cmdline()):
                        process.kill()
                        killed.append(process.pid)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.05)

    engine = RayEngine(bundle, address=cluster.address, batch_size=2)
    try:
        rows = []
        for prediction in engine.predict(paths):
            if not rows:
                threading.Thread(target=kill_one_worker, daemon=True).start()
            rows.append(prediction)
    finally:
        engine.close()
    assert killed, "no worker process was found to kill"
    assert sorted(p.source for p in rows) == sorted(str(p) for p in paths)
    assert all(p.status == "ok" for p in rows), [p.error for p in rows if p.status != "ok"]


def test_every_node_must_read_the_paths(cluster, ray_env, bundle: Path, tmp_path: Path) -> None:
    from pneumoedge.runtime.ray_engine import RayEngine, RayEngineError

    engine = RayEngine(bundle, address=cluster.address)
    try:
        with pytest.raises(RayEngineError, match="cannot read .*same paths"):
            engine.check_paths(str(tmp_path / "only-on-the-driver.png"))
    finally:
        engine.close()


def test_killed_driver_leaves_nothing_and_resume_gives_one_row_per_file(bundle: Path, tmp_path: Path) -> None:
    # No --ray-address: the CLI starts its private local Ray (on 127.0.0.1, its own token).
    folder = _images(tmp_path / "many", 200, size=(700, 600))
    out = tmp_path / "r.jsonl"
    args = [str(folder), "-m", str(bundle), "-o", str(out), "--engine", "ray", "--batch", "2"]
    command = [sys.executable, "-m", "pneumoedge", "infer", *args]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.005)
    assert driver.poll() is None, f"the run ended before it could be killed: {driver.stderr.read()[-2000:]}"
    ray_processes = _private_ray_processes()
    assert len(ray_processes) >= 3, "the private Ray's processes were not found"
    _loopback_only(ray_processes)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    rows_before = out.read_bytes().count(b"\n")
    assert 0 < rows_before < 200

    deadline = time.time() + 45
    while time.time() < deadline and [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        time.sleep(0.2)
    left = [(p.pid, p.name()) for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind by the killed driver's Ray: {left}"

    resumed = _infer(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "kept from earlier run" in resumed.stderr
    rows = _rows(out)
    assert len(rows) == 200 and all(r["status"] == "ok" for r in rows.values())
    time.sleep(1.0)
    assert not _private_ray_processes(), "a normal run left Ray processes behind"


def test_clear_errors_without_ray_or_without_a_cluster(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", gradient_image(40, 40, 1))[1].tobytes())
    unreachable = _infer(str(tmp_path), "-m", str(bundle), "--engine", "ray", "--ray-address", "127.0.0.1:9", timeout=60)
    assert unreachable.returncode == 2 and "no Ray cluster answers at 127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    missing = _infer(str(tmp_path), "-m", str(bundle), "--engine", "ray", env={"PYTHONPATH": str(blocker)}, timeout=60)
    assert missing.returncode == 2 and 'pip install "pneumoedge[ray]"' in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_bundle_changed_after_the_driver_loaded_it_fails_on_the_workers(cluster, ray_env, bundle: Path, tmp_path: Path) -> None:
    from pneumoedge.runtime.ray_engine import RayEngine, RayEngineError

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    folder = _images(tmp_path / "in", 3)
    engine = RayEngine(copy, address=cluster.address)
    try:
        member = copy / "gray.onnx" if (copy / "gray.onnx").exists() else next(copy.glob("*.onnx"))
        data = bytearray(member.read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
        member.write_bytes(bytes(data))
        with pytest.raises(RayEngineError, match="sha256|checksum|changed") as failure:
            list(engine.predict(sorted(folder.iterdir())))
        print(failure.value)
    finally:
        engine.close()
