"""The Ray engine: a folder run's predictions on a Ray cluster (Ray Data actor pools).

`run_folder` keeps the row contract (discovery, skipped/error rows, resume, one whole line
per write, summary); this engine only computes the image rows, on Ray Data's `map_batches`
with an actor pool. Each actor does `pneumoedge.load(<bundle path>)` once (the path travels,
never the model bytes; loading verifies the checksums on that worker), sets onnxruntime's
threads to its CPUs and runs `Ensemble.predict_many`, the local engine's code.

Failures become rows. An unreadable file is an error row from `predict_many` itself. A worker
process that dies (a decoder crash, out of memory, a kill) is restarted by Ray and its batch
retried; a small ledger actor remembers which batches and files were in flight, so the retry
runs that batch file by file and a file that was in flight during `max_deaths` deaths becomes
an error row instead of crashing workers forever. A batch with no result within `timeout_s`
is handled the same way (the worker leaves, a file that hangs becomes an error row). Any path
whose row never came back is an error row too: nothing is dropped silently.

Without an address a private local Ray is started by a helper process in its own session,
on 127.0.0.1 only, with a random token; when the driver ends (normally, or killed: the
helper reads a pipe from the driver and sees it close), the helper stops Ray and kills
whatever is left in its session. Ray is imported lazily: `pip install "pneumoedge[ray]"`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from pneumoedge.network import is_loopback as is_loopback_host
from pneumoedge.runtime.engine import Postprocess
from pneumoedge.runtime.prediction import Prediction

log = logging.getLogger(__name__)

INSTALL_HINT = 'the Ray engine needs Ray Data: pip install "pneumoedge[ray]"'
#: Environment for Ray processes and the driver that keeps every part on loopback: with it,
#: Ray's node address is 127.0.0.1, so the GCS, raylets, workers and agents bind and
#: advertise 127.0.0.1 (`_node_ip_address="127.0.0.1"` alone is turned back into the
#: machine's address). Usage statistics stay off.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
#: Image paths handed to one Ray Data job; the driver holds one window's paths at a time.
WINDOW = 100_000
_HEAD_START_TIMEOUT_S = 120.0


class RayEngineError(RuntimeError):
    """The Ray engine cannot run as asked (Ray missing, cluster unreachable, paths not shared)."""


def import_ray() -> Any:
    """The `ray` module with Ray Data, or a RayEngineError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayEngineError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def is_loopback(address: Optional[str]) -> bool:
    """True for None (a private local Ray) or an address whose host is 127.x, ::1 or localhost."""
    if address is None:
        return True
    return is_loopback_host(address.split("://")[-1].rsplit(":", 1)[0].strip("[]"))


# -- the worker side --------------------------------------------------------------------------


class _Ledger:
    """Counts, per batch or file, how often work began and finished: the difference is how many
    workers died holding it. Lives in the driver's job (one per run), zero CPUs."""

    def __init__(self) -> None:
        self.began: Counter = Counter()
        self.finished: Counter = Counter()
        self.reasons: dict[str, str] = {}

    def begin(self, key: str) -> tuple[int, str]:
        """(deaths so far while holding `key`, the last reason noted), and count this start."""
        deaths = self.began[key] - self.finished[key]
        self.began[key] += 1
        return deaths, self.reasons.get(key, "")

    def finish(self, key: str) -> None:
        self.finished[key] += 1

    def note(self, key: str, reason: str) -> None:
        self.reasons[key] = reason


class _Worker:
    """A Ray Data actor: one loaded model; batches of paths in, finished rows (JSON) out."""

    #: Set on a subclass per run (`_worker_class`), so the actor takes no constructor arguments
    #: of ours: everything a restarted actor needs travels with its class.
    loader: Callable[[], Any]
    ledger: Any
    batch_size: int
    cpus: int
    timeout_s: float
    max_deaths: int

    def __init__(self) -> None:
        import ray

        self.ensemble = self.loader()  # pneumoedge.load(path): checksums verified here, on this worker
        self.node = ray.get_runtime_context().get_node_id()
        self._ray = ray
        # One thread runs predictions so that a hang can be timed; it is never joined after one.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumoedge-ray")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        paths = [str(p) for p in batch["path"]]
        key = "batch:" + hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
        deaths, _ = self._ray.get(self.ledger.begin.remote(key))
        if deaths == 0:
            rows = self._timed(paths, key)
        else:  # a worker died holding this batch: find the file, one at a time
            rows = []
            for path in paths:
                rows += self._one_file(path)
        self.ledger.finish.remote(key)
        return {"row": [json.dumps(p.to_dict(), ensure_ascii=False) for p in rows], "node": [self.node] * len(rows)}

    def _one_file(self, path: str) -> list[Prediction]:
        deaths, reason = self._ray.get(self.ledger.begin.remote(path))
        if deaths >= self.max_deaths or reason.startswith("timeout"):
            self._ray.get(self.ledger.finish.remote(path))
            why = (
                f"no result within {self.timeout_s:g} s (the Ray worker was replaced); not retried"
                if reason.startswith("timeout")
                else f"the Ray worker process died {deaths} times while predicting this file (crash, out of memory or killed); not retried"
            )
            return [Prediction(source=path, status="error", error=why)]
        rows = self._timed([path], path)
        self._ray.get(self.ledger.finish.remote(path))
        return rows

    def _timed(self, paths: list[str], key: str) -> list[Prediction]:
        future = self._pool.submit(self._predict, paths)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            # A stuck read (a dead network share) cannot be interrupted: note it and leave.
            # Ray restarts this actor and retries the batch, which then skips what hung.
            self._ray.get(self.ledger.note.remote(key, "timeout"))
            log.error("no result within %g s for %s; this Ray worker exits", self.timeout_s, key)
            os._exit(3)

    def _predict(self, paths: list[str]) -> list[Prediction]:
        try:
            return list(self.ensemble.predict_many(paths, batch_size=self.batch_size, workers=self.cpus, runners=1))
        except Exception as exc:  # an unexpected failure stays a row per file, never a dead job
            reason = f"prediction failed on the Ray worker: {type(exc).__name__}: {exc}"
            return [Prediction(source=p, status="error", error=reason) for p in paths]


def _worker_class(**settings: Any) -> type:
    return type("PneumoedgeWorker", (_Worker,), dict(settings))


def _check_paths(paths: Sequence[str]) -> list[str]:
    """The paths this node cannot read (run on each node before the pool starts)."""
    return [p for p in paths if not os.access(p, os.R_OK)]


# -- the driver side --------------------------------------------------------------------------


def _from_dict(record: dict[str, Any]) -> Prediction:
    return Prediction(
        source=record["path"], status=record["status"], label=record["label"], probability=record["probability"],
        probabilities=record["probabilities"], member_probabilities=record["member_probabilities"],
        disagreement=record["disagreement"], threshold=record["threshold"], provider=record["provider"],
        error=record["error"], ood=record["ood"], ood_score=record["ood_score"], overlay_path=record["overlay"],
    )


def _reachable(address: str, timeout: float = 10.0) -> None:
    """Fail clearly, instead of Ray's endless retries, when nothing answers at HOST:PORT."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise RayEngineError(f"no Ray cluster answers at {address} ({exc}); give the head's HOST:PORT (6379 by default)") from None


def _refresh_ray_config() -> None:
    """Make an already imported Ray see this run's RAY_AUTH_* variables (it caches them)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # another Ray version: its own reading applies
        pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


class LocalRay:
    """A private Ray on this computer, started by a helper process in its own session.

    The helper holds the read end of a pipe from this process; when this process closes it or
    dies (even by SIGKILL), the helper stops Ray and kills every process left in its session.
    """

    def __init__(self, num_cpus: int, env: dict[str, str]) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="pe-ray-")  # short: Ray's socket paths must fit 107 bytes
        command = [sys.executable, "-m", "pneumoedge.runtime.ray_engine", "--head", str(num_cpus), self.temp_dir]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **env}, start_new_session=True, text=True,
        )
        line = _read_line(self.process, _HEAD_START_TIMEOUT_S)
        try:
            self.address = json.loads(line)["address"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise RayEngineError(f"the local Ray did not start: {(stderr or line).strip()[-800:]}") from None

    def stop(self, timeout: float = 30.0) -> None:
        """Close the pipe (the helper stops Ray); kill the session if it takes too long."""
        try:
            if self.process.stdin:
                self.process.stdin.close()
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(self.process.pid)
            self.process.wait()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` except the caller (Ray's workers have their own
    process groups, so a process-group kill would miss them; the session holds them all)."""
    import psutil

    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and os.getsid(process.pid) == sid:
                process.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def _serve_head(num_cpus: int, temp_dir: str) -> None:
    """The helper: start Ray here, print its address, stop it when stdin closes (the driver went)."""
    import shutil

    os.environ.update(LOOPBACK_ENV)
    finished = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: finished.set())
    # Watch the pipe from the start: a driver killed while Ray is starting is noticed too.
    threading.Thread(target=lambda: (sys.stdin.read(), finished.set()), daemon=True).start()
    try:
        ray = import_ray()
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
            _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
        )
        print(json.dumps({"address": ray.get_runtime_context().gcs_address}), flush=True)
        finished.wait()
        # Ray's own shutdown first; whatever it leaves (agents notice a dead raylet only after a
        # minute) is killed with the session, by a timer should the shutdown itself hang.
        threading.Timer(20.0, _kill_session, args=(os.getsid(0),)).start()
        ray.shutdown()
    except BrokenPipeError:  # the driver went before the address could be handed over
        pass
    except Exception as exc:  # one line for the driver's error message, not a traceback
        print(f"{_short(exc)}", file=sys.stderr, flush=True)
    finally:
        _kill_session(os.getsid(0))
        shutil.rmtree(temp_dir, ignore_errors=True)
        os._exit(0)


class RayEngine:
    """Computes a folder run's image rows on Ray (see the module docstring); an `Engine`.

    Args:
        model: what `pneumoedge.load` takes (a bundle folder, `.onnx` paths, None: the default
            bundle), resolved to paths every worker must see at the same place.
        precision: the driver's resolved precision ("fp32"/"int8"), so that every worker runs
            the same members whatever its own CPU would choose.
        address: an existing cluster ("HOST:PORT"); None starts a private local Ray.
        cpus_per_worker: CPUs (and onnxruntime threads) of each actor.
        workers: actors in the pool; default: the cluster's CPUs / cpus_per_worker.
        timeout_s: a batch (or, on retry, a file) with no result by then is given up.
        max_deaths: worker deaths a file may cause before it becomes an error row.
        loader: builds the worker's model (default: `pneumoedge.load` of `model`); picklable.
    """

    def __init__(
        self,
        model: Union[str, Path, Sequence[Union[str, Path]], None] = None,
        *,
        device: str = "cpu",
        precision: str = "auto",
        batch_size: int = 8,
        address: Optional[str] = None,
        cpus_per_worker: int = 1,
        workers: Optional[int] = None,
        local_cpus: Optional[int] = None,
        timeout_s: float = 300.0,
        max_deaths: int = 2,
        loader: Optional[Callable[[], Any]] = None,
        site: Optional[Union[str, Path]] = None,
    ) -> None:
        from pneumoedge.runtime.loading import default_bundle_path, load

        self._saved_env: dict[str, Optional[str]] = {}
        self._saved_cluster_flag: Optional[bool] = None
        fresh = "ray" not in sys.modules
        self._set_env(address)  # before Ray's import where possible: it reads some of it once
        try:
            self.ray = import_ray()
        except RayEngineError:
            self._restore_env()
            raise
        if not fresh:
            _refresh_ray_config()
        refs = [default_bundle_path()] if model is None else [model] if isinstance(model, (str, Path)) else list(model)
        self.model_paths = [str(Path(r).resolve()) for r in refs]
        target = self.model_paths[0] if len(self.model_paths) == 1 else self.model_paths
        site = str(Path(site).resolve()) if site is not None else None  # a site.json: workers decide with its threshold
        self.loader = loader or functools.partial(load, target, device=device, precision=precision, threads=cpus_per_worker, site=site)
        self.batch_size = batch_size
        self.cpus_per_worker = cpus_per_worker
        self.timeout_s = timeout_s
        self.max_deaths = max_deaths
        self.address = address
        self.rows_per_node: Counter = Counter()
        self.start_s = 0.0
        self._local: Optional[LocalRay] = None
        self._checked = False
        started = time.perf_counter()
        self._connect(address, local_cpus or os.cpu_count() or 1)
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        self.workers = workers or max(1, cpus // cpus_per_worker)
        if cpus < cpus_per_worker:
            self.close()
            raise RayEngineError(f"the Ray cluster has {cpus} CPUs; each worker needs {cpus_per_worker}")
        self.start_s = time.perf_counter() - started
        self.provider = f"ray: {self.workers} workers x {cpus_per_worker} CPU, CPUExecutionProvider"

    def _set_env(self, address: Optional[str]) -> None:
        env = dict(LOOPBACK_ENV) if is_loopback(address) else {"RAY_USAGE_STATS_ENABLED": "0"}
        if address is None:  # a private cluster: a random token of its own, nothing in ~/.ray
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self._env = env
        self._saved_env = {name: os.environ.get(name) for name in env}
        os.environ.update(env)

    def _restore_env(self) -> None:
        if self._saved_cluster_flag is not None:
            self.ray._private.ray_constants.ENABLE_RAY_CLUSTER = self._saved_cluster_flag
            self._saved_cluster_flag = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def _connect(self, address: Optional[str], local_cpus: int) -> None:
        env = self._env
        # Ray derives this from the environment once, at import (maybe before this run).
        constants = self.ray._private.ray_constants
        self._saved_cluster_flag = constants.ENABLE_RAY_CLUSTER
        constants.ENABLE_RAY_CLUSTER = not is_loopback(address)
        try:
            if address is None:
                self._local = LocalRay(local_cpus, env)
                address = self._local.address
            _reachable(address)
            loopback = {"_node_ip_address": "127.0.0.1"} if is_loopback(address) else {}
            self.ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **loopback)
        except RayEngineError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise RayEngineError(f"cannot connect to the Ray cluster at {address}: {_short(exc)}") from None
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # run_folder's progress callback reports instead
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # e.g. "progress bars disabled"
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)

    def check_paths(self, first: str) -> None:
        """Fail clearly unless every alive node reads the model files and `first` (an input)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(num_cpus=0)(_check_paths)
        paths = [first, *self.model_paths]
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes
        ]
        for node, missing in zip(nodes, self.ray.get(refs, timeout=120)):
            if missing:
                raise RayEngineError(
                    f"Ray node {node.get('NodeManagerAddress')} cannot read {missing[0]}: every node must see the "
                    "inputs and the model at the same paths (shared storage mounted at the same place)"
                )

    def predict(self, paths: Iterable[Path], *, explain: bool = False, postprocess: Optional[Postprocess] = None) -> Iterator[Prediction]:
        """One Prediction per path, in no fixed order; see the module docstring."""
        if explain or postprocess is not None:
            raise RayEngineError("heatmaps are not available with the Ray engine; run them with the local engine")
        window: list[str] = []
        for path in paths:
            window.append(str(path))
            if len(window) >= WINDOW:
                yield from self._run_window(window)
                window = []
        if window:
            yield from self._run_window(window)

    def _run_window(self, window: list[str]) -> Iterator[Prediction]:
        ray = self.ray
        if not self._checked and self.address is not None:
            readable = next((p for p in window if os.path.isfile(p) and os.access(p, os.R_OK)), None)
            if readable is not None:
                self.check_paths(readable)
            self._checked = True
        ledger = ray.remote(num_cpus=0)(_Ledger).remote()
        # Blocks: enough that every worker gets some, few enough that Ray's per-block cost stays small.
        blocks = min(len(window), max(self.workers, min(-(-len(window) // self.batch_size), 32 * self.workers)))
        dataset = ray.data.from_items([{"path": p} for p in window], override_num_blocks=blocks).map_batches(
            _worker_class(
                loader=self.loader, ledger=ledger, batch_size=self.batch_size, cpus=self.cpus_per_worker,
                timeout_s=self.timeout_s, max_deaths=self.max_deaths,
            ),
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            batch_size=self.batch_size,
            num_cpus=self.cpus_per_worker,
            batch_format="numpy",
        )
        pending = set(window)
        failure = ""
        try:
            for row in dataset.iter_rows():
                prediction = _from_dict(json.loads(row["row"]))
                if prediction.source in pending:  # a retried task may hand a row back twice
                    pending.discard(prediction.source)
                    self.rows_per_node[row["node"]] += 1
                    yield prediction
        except Exception as exc:  # the Ray job failed: what did not come back becomes error rows
            failure = _short(exc)
            log.error("the Ray job failed: %s", failure)
            if len(pending) == len(window):
                raise RayEngineError(f"the Ray job failed before any result came back: {failure}") from None
        finally:
            ray.kill(ledger)
        reason = f"the Ray job failed before this file's result came back: {failure}" if failure else "no result came back from the Ray workers"
        for path in window:
            if path in pending:
                yield Prediction(source=path, status="error", error=reason)

    def close(self) -> None:
        """Disconnect; stop the private local Ray (and every process it started)."""
        try:
            if self.ray.is_initialized():
                self.ray.shutdown()
        finally:
            if self._local is not None:
                self._local.stop()
                self._local = None
            self._restore_env()


def engine_for(ensemble: Any, model: Any, *, device: str, batch_size: int, threads: Optional[int], address: Optional[str],
               site: Optional[Union[str, Path]] = None) -> RayEngine:
    """A RayEngine running `model` as `ensemble` was loaded here (its precision), `threads` CPUs per worker."""
    if device not in ("cpu", "auto"):  # actors ask Ray for CPUs only; GPU workers would need num_gpus and a test
        raise RayEngineError("--engine ray runs on CPUs only; leave out --device (or use the local engine for CUDA)")
    configuration = getattr(ensemble, "configuration", None)
    precision = configuration.precision if configuration is not None else "auto"
    return RayEngine(model, device="cpu", precision=precision, batch_size=batch_size, address=address, cpus_per_worker=threads or 1, site=site)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--head":
    _serve_head(int(sys.argv[2]), sys.argv[3])
