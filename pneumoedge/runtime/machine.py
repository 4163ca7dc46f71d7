"""This computer as the runtime sees it: CPU model, the SIMD flags that decide int8 speed, cache folder."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def fast_int8(self) -> bool:
        """Whether int8 kernels have hardware help here (VNNI or AMX, or Arm dot products)."""
        return any(flag in self.flags for flag in FAST_INT8_FLAGS)

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
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown CPU",
        flags=tuple(f for f in SIMD_FLAGS if f in flags),
        logical_cores=os.cpu_count() or 1,
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
