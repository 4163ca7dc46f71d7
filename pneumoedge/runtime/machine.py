"""This computer as the runtime sees it: CPU model, the SIMD flags that decide int8 speed, cache folder."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pneumoedge.atomic import write_atomic

log = logging.getLogger(__name__)

#: SIMD flags worth naming (Linux /proc/cpuinfo spelling). VNNI (AVX-512 or AVX) and AMX give
#: onnxruntime's int8 kernels their speed; without them int8 is often slower than fp32.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp", "i8mm")
#: Flags whose presence makes int8 matrix kernels fast (x86 VNNI/AMX; Arm dot-product and i8mm).
FAST_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name, its SIMD flags among `SIMD_FLAGS`, and its core counts."""

    model: str
    flags: tuple[str, ...]
    logical_cores: int
    #: Distinct (package, core) pairs listed; 0 where /proc/cpuinfo does not say.
    listed_cores: int = 0

    @property
    def physical_cores(self) -> int:
        """Physical cores: as listed in /proc/cpuinfo, else the logical CPUs."""
        return self.listed_cores or self.logical_cores

    @property
    def fast_int8_flags(self) -> tuple[str, ...]:
        """This CPU's flags among `FAST_INT8_FLAGS`."""
        return tuple(flag for flag in self.flags if flag in FAST_INT8_FLAGS)

    @property
    def fast_int8(self) -> bool:
        """Whether int8 kernels have hardware help here (VNNI or AMX, or Arm dot products)."""
        return bool(self.fast_int8_flags)

    @property
    def flags_text(self) -> str:
        """The flags as people search for them: "avx2 avx512_vnni amx" or "none of ..."."""
        return " ".join(self.flags) if self.flags else "no AVX2/VNNI/AMX"

    def to_dict(self) -> dict:
        return {"cpu": self.model, "simd": list(self.flags), "fast_int8": self.fast_int8, "logical_cores": self.logical_cores}


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Read once per process from /proc/cpuinfo (Linux); elsewhere the model from `platform`, no flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> CpuInfo:
    """A CpuInfo from /proc/cpuinfo's text (x86 "model name"/"flags", Arm "Features")."""
    model, flags = "", set()
    cores, package = set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown CPU",
        flags=tuple(f for f in SIMD_FLAGS if f in flags),
        logical_cores=os.cpu_count() or 1,
        listed_cores=len(cores),
    )


def cache_dir() -> Path:
    """Where per-user, per-machine choices are kept (never inside a bundle, which stays read-only).

    PNEUMOEDGE_CACHE_DIR when set; else $XDG_CACHE_HOME/pneumoedge; else ~/.cache/pneumoedge
    (%LOCALAPPDATA%\\pneumoedge on Windows). Not created here: writers create it.
    """
    override = os.environ.get("PNEUMOEDGE_CACHE_DIR", "").strip()
    if override:
        return Path(override).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "pneumoedge"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pneumoedge"


# -- caches that make a process start faster on this computer ------------------------------

#: Members at least this large keep onnxruntime's optimized graph in the cache folder: their
#: session creation (graph optimisation) costs a few tenths of a second; small ones' does not.
OPTIMIZED_GRAPH_MIN_BYTES = 2_000_000


def optimized_graph_file(member_sha256: str, size_bytes: int, device: str) -> Optional[Path]:
    """Where a member's optimized graph is kept for this CPU and onnxruntime (None: not worth it).

    Named by the member's checksum and a digest of CPU model, SIMD flags and onnxruntime
    version, because the optimized graph holds kernels chosen for exactly those.
    PNEUMOEDGE_OPTIMIZED_CACHE=0 turns it off.
    """
    if device != "cpu" or size_bytes < OPTIMIZED_GRAPH_MIN_BYTES or os.environ.get("PNEUMOEDGE_OPTIMIZED_CACHE", "1") == "0":
        return None
    import onnxruntime as ort

    cpu = cpu_info()
    machine = hashlib.sha256(json.dumps([cpu.model, list(cpu.flags), ort.__version__]).encode()).hexdigest()[:12]
    return cache_dir() / "optimized" / f"{member_sha256[:32]}-{machine}.onnx"


def file_stat(path: Path) -> Optional[list[int]]:
    """(device, inode, size, mtime_ns, ctime_ns) of a file, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # ctime cannot be set back by touch: any write to the file changes it.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _verified_file(sha256: str) -> Path:
    return cache_dir() / "verified" / f"{sha256[:32]}.json"


def verified_before(path: Path, sha256: str) -> bool:
    """Whether this very file (same device, inode, size, mtime and ctime) already hashed to `sha256`.

    Git trusts its index the same way. Used for big members only (an 80 MB member costs ~0.2 s
    of CPU to hash on every start); `pneumoedge info` and PNEUMOEDGE_ALWAYS_HASH=1 hash anyway.
    """
    if os.environ.get("PNEUMOEDGE_ALWAYS_HASH", "0") == "1":
        return False
    try:
        record = json.loads(_verified_file(sha256).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    now = file_stat(path)
    return isinstance(record, dict) and now is not None and record.get("sha256") == sha256 \
        and record.get("path") == str(Path(path).resolve()) and record.get("stat") == now


def remember_verified(path: Path, sha256: str, stat_before: Optional[list[int]]) -> None:
    """Record that `path` hashed to `sha256`, when it did not change while it was read."""
    now = file_stat(path)
    if now is None or now != stat_before:
        return
    target = _verified_file(sha256)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, json.dumps({"sha256": sha256, "path": str(Path(path).resolve()), "stat": now}))
    except OSError as exc:
        log.info("checksum record %s not written (%s)", target, exc)
