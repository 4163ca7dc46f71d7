"""Timing, statistics, memory and machine descriptions shared by `bench`, `tune` and benchmarks/."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np
import onnxruntime as ort

from pneumoedge.runtime.machine import cpu_info

STAT_KEYS = ("count", "min", "mean", "std", "p50", "p90", "p95", "p99", "max")
_PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}


class BenchError(ValueError):
    """Bench settings that cannot be run (shown to the user as one line)."""


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Latency statistics in milliseconds (keys `STAT_KEYS`) of per-run times in seconds."""
    if not len(seconds):
        raise BenchError("no timings to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    stats: dict[str, float] = {"count": int(ms.size), "min": float(ms.min()), "mean": float(ms.mean()), "std": float(ms.std())}
    for key, q in _PERCENTILES.items():
        stats[key] = float(np.percentile(ms, q))
    stats["max"] = float(ms.max())
    # Rounding noise must not break min <= mean <= max for a constant series.
    stats["mean"] = min(max(stats["mean"], stats["min"]), stats["max"])
    return {k: stats[k] for k in STAT_KEYS}


def time_calls(fn: Callable[[int], Any], runs: int, warmup: int = 0) -> list[float]:
    """Call `fn(i)` `warmup` times untimed, then `runs` times; return each timed call's seconds."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory so far, in MiB (None where the OS does not say)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # macOS: bytes; Linux: KiB
    except ImportError:  # Windows: psutil is optional there
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except Exception:
            return None


def rss_mb() -> Optional[float]:
    """Current resident memory in MiB (Linux /proc; psutil elsewhere when installed)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except Exception:
            return None


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): how busy the computer was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """The computer a figure was measured on (`runtime.machine.cpu_info` is the one CPU reader)."""
    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "simd": cpu.flags_text,  # VNNI/AMX decide whether int8 is fast here
        "fast_int8": cpu.fast_int8,
        "physical_cores": cpu.physical_cores,
        "logical_cores": cpu.logical_cores,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions() -> dict[str, str]:
    from pneumoedge import __version__

    return {"pneumoedge": __version__, "onnxruntime": ort.__version__, "numpy": np.__version__, "opencv": cv2.__version__}
