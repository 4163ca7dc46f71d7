"""The configuration a bundle runs with on this computer: precision, threads, runners and batch.

`pneumoedge tune` measures the candidates on X-ray-sized phantoms and stores the fastest in the
user's cache folder (`machine.cache_dir()`), keyed by the bundle's manifest sha256, the CPU
model and SIMD flags, and the onnxruntime version: a bundle is built once and shipped to many
computers, so its own `default_precision` cannot know which is fastest where it lands. The
bundle itself is never written. Without a stored choice, a rule decides and the configuration
says "untuned": int8 only where the bundle's int8 members passed their accuracy check AND either
the export timed int8 faster on a similar CPU (same int8 hardware flags), or, with no such
timing, the CPU has VNNI or AMX. A damaged or foreign cache entry is ignored with a
warning, never a crash.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import onnxruntime as ort

from pneumoedge.atomic import write_atomic
from pneumoedge.bundle import MANIFEST, Manifest
from pneumoedge.int8_tolerance import Tolerance
from pneumoedge.runtime.machine import FAST_INT8_FLAGS, CpuInfo, cache_dir, cpu_info

log = logging.getLogger(__name__)

SCHEMA = "pneumoedge.tune/1"
PRECISION_CHOICES = ("auto", "default", "fp32", "int8")
#: int8 must beat the best fp32 figure by this share to be chosen: fp32 is the reference, and
#: a difference smaller than this is noise on a shared computer.
INT8_MARGIN = 0.05
#: Member files above this many bytes (fp32) count as big models: one run on every core beats
#: one run per core there (their weights and activations no longer fit a core's caches, and a
#: batch on one core would make the first result wait). Measured in docs/speed.md.
BIG_MODEL_BYTES = 8_000_000


@dataclass(frozen=True)
class Configuration:
    """How a model runs here, and where that came from ("tuned", "untuned" or "user")."""

    precision: str
    threads: Optional[int]
    batch: int
    source: str
    reason: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def runners(self) -> int:
        """Batches run at once: one per core with 1 thread each (how `predict_many` schedules)."""
        cores = os.cpu_count() or 1
        return 1 if self.threads is None else max(1, cores // self.threads)

    def describe(self) -> str:
        """One line for summaries: "int8, 1 thread x 2 runners, batch 8 (tuned: ...)"."""
        threads = "all cores" if self.threads is None else f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{self.precision}, {threads} x {self.runners} runner{'s' if self.runners > 1 else ''}, batch {self.batch} ({self.source}: {self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "threads": self.threads, "runners": self.runners, "batch": self.batch,
                "source": self.source, "reason": self.reason, "warnings": list(self.warnings)}


def bundle_sha256(manifest: Manifest) -> str:
    """The bundle's identity: sha256 of its manifest.json, which holds every member's sha256."""
    if manifest.root is None:
        raise ValueError("the manifest was not read from a bundle folder")
    return hashlib.sha256((Path(manifest.root) / MANIFEST).read_bytes()).hexdigest()


def int8_passed(manifest: Manifest) -> tuple[bool, str]:
    """Whether the bundle's int8 members passed the export's accuracy check, and why we think so."""
    if "int8" not in manifest.precisions:
        return False, "the bundle has no int8 members"
    if manifest.default_precision == "int8":
        return True, "int8 is the bundle's default (it passed its accuracy check)"
    provenance = manifest.provenance or {}
    foreign = provenance.get("int8")
    if isinstance(foreign, dict) and "ok" in foreign:
        return bool(foreign["ok"]), "int8 accuracy check " + ("passed" if foreign["ok"] else "failed")
    records = provenance.get("members") or {}
    names = {m.name for m in manifest.members if m.precision == "int8"}
    checks = [((records.get(n) or {}).get("int8") or {}).get("meets_tolerance") for n in names]
    if not checks or any(c is not True for c in checks):
        return False, "the manifest does not show that the int8 members passed their accuracy check"
    ensemble = (provenance.get("metrics") or {}).get("int8_vs_fp32")
    if isinstance(ensemble, dict) and not Tolerance().holds(ensemble.get("max_prob_diff", 1.0), ensemble.get("agreement", 0.0)):
        return False, "the int8 ensemble missed the accuracy tolerance on validation data"
    return True, "every int8 member passed its accuracy check"


def _member_bytes(manifest: Manifest, precision: str) -> int:
    total = 0
    for member in manifest.members_for(precision):
        try:
            total = max(total, os.path.getsize(member.path))
        except OSError:
            pass
    return total


def export_timing(manifest: Manifest, cpu: CpuInfo) -> Optional[tuple[float, float, str]]:
    """(fp32 ms, int8 ms, the export's CPU) as the export timed every int8 member beside its fp32
    one, when that CPU was similar to `cpu` (the same int8 hardware: VNNI/AMX/dot-product flags);
    None when the export did not record the timings or its CPU, or its CPU was different.

    Read from provenance: `machine` ({cpu, simd}, as `CpuInfo.to_dict()`) and, per member,
    `members.<name>.int8.latency_ms` ({fp32, int8}).
    """
    provenance = manifest.provenance or {}
    machine = provenance.get("machine")
    if not isinstance(machine, dict) or not isinstance(machine.get("simd"), list):
        return None
    if tuple(f for f in FAST_INT8_FLAGS if f in machine["simd"]) != cpu.fast_int8_flags:
        return None
    records = provenance.get("members") or {}
    fp32 = int8 = 0.0
    for name in {m.name for m in manifest.members if m.precision == "int8"}:
        timing = ((records.get(name) or {}).get("int8") or {}).get("latency_ms") or {}
        if not all(isinstance(timing.get(k), (int, float)) and timing[k] > 0 for k in ("fp32", "int8")):
            return None
        fp32, int8 = fp32 + timing["fp32"], int8 + timing["int8"]
    return (fp32, int8, str(machine.get("cpu", "?"))) if fp32 > 0 else None


def _untuned_precision(manifest: Manifest, cpu: CpuInfo) -> tuple[str, str]:
    """fp32 or int8 for a bundle with both, and why: the export's own timing on a similar CPU
    when it recorded one, else the CPU's flags (int8 kernels need VNNI/AMX to be fast, usually)."""
    passed, passed_why = int8_passed(manifest)
    if not passed:
        return "fp32", passed_why
    timing = export_timing(manifest, cpu)
    if timing is not None:
        fp32, int8, where = timing
        measured = f"the export timed int8 {int8:.1f} ms vs fp32 {fp32:.1f} ms on a similar CPU ({where})"
        if int8 * (1 + INT8_MARGIN) <= fp32:
            return "int8", f"{passed_why}; {measured}"
        return "fp32", f"{measured}: int8 not faster by {INT8_MARGIN:.0%}"
    if cpu.fast_int8:
        return "int8", f"{passed_why}; this CPU has {'/'.join(cpu.fast_int8_flags)}"
    return "fp32", "no VNNI/AMX on this CPU and no export timing from a similar one: int8 kernels are usually slower than fp32 here"


def rule(
    manifest: Optional[Manifest], cpu: Optional[CpuInfo] = None, *, model_bytes: int = 0, precision: Optional[str] = None
) -> Configuration:
    """The untuned choice from the CPU's features and the model's size (no measurement).

    `precision` fixes the precision (the user's); otherwise the CPU and the bundle decide it.
    """
    cpu = cpu or cpu_info()
    if precision is not None:
        why = f"{precision} as asked"
    elif manifest is None:
        precision, why = "as given", "ONNX files run as they are"
    elif len(manifest.precisions) == 1:
        precision, why = manifest.precisions[0], f"the bundle has only {manifest.precisions[0]}"
    else:
        precision, why = _untuned_precision(manifest, cpu)
    size = model_bytes or (_member_bytes(manifest, precision) if manifest is not None else 0)
    big = size > BIG_MODEL_BYTES
    threads = None if big else 1
    why += "; " + (f"a big model ({size / 1e6:.0f} MB): one run on all cores" if big else "one run per core")
    if manifest is not None:
        why += "; `pneumoedge tune` measures instead"
    return Configuration(precision, threads, 4 if big else 8, "untuned", why)


# -- the cache -------------------------------------------------------------------------------


def cache_key(manifest: Manifest, device: str, cpu: Optional[CpuInfo] = None) -> dict[str, Any]:
    """What a stored choice is valid for: this bundle, this CPU, this onnxruntime, this device."""
    cpu = cpu or cpu_info()
    return {"bundle_sha256": bundle_sha256(manifest), "cpu": cpu.model, "simd": list(cpu.flags),
            "logical_cores": cpu.logical_cores, "onnxruntime": ort.__version__, "device": device}


def cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "tuning" / f"{digest}.json"


def store(manifest: Manifest, device: str, choice: Configuration, measured: Sequence[dict[str, Any]], **extra: Any) -> Path:
    """Write the measured choice for this bundle and machine (atomically) and return the file."""
    key = cache_key(manifest, device)
    path = cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "key": key,
        "bundle": str(manifest.root),
        "choice": {"precision": choice.precision, "threads": choice.threads, "batch": choice.batch, "reason": choice.reason},
        "measured": list(measured),
        **extra,
    }
    return write_atomic(path, json.dumps(record, indent=2))


def read_stored(manifest: Manifest, device: str) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The stored record for this bundle and machine, or None; plus warnings about a bad entry."""
    try:
        key = cache_key(manifest, device)
    except OSError as exc:
        return None, [f"cannot read the bundle's manifest to look up its tuning: {exc}"]
    path = cache_file(key)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return None, [f"tuning cache {path} unreadable ({exc.strerror or exc}); ignored"]
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} record")
        if record.get("key") != key:
            return None, [f"tuning cache {path} belongs to another bundle, CPU or onnxruntime; ignored (run `pneumoedge tune`)"]
        choice = record["choice"]
        precision, threads, batch = choice["precision"], choice["threads"], choice["batch"]
        if precision not in manifest.precisions:
            raise ValueError(f"precision {precision!r} is not in this bundle")
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ValueError(f"threads {threads!r}")
        if type(batch) is not int or batch < 1:
            raise ValueError(f"batch {batch!r}")
    except (ValueError, KeyError, TypeError) as exc:
        return None, [f"tuning cache {path} is damaged ({exc}); ignored (run `pneumoedge tune` again)"]
    return record, []


def _best_stored(record: dict[str, Any], precision: Optional[str]) -> Optional[dict[str, Any]]:
    """The stored choice, or (when the user fixed the precision) the fastest measured row at it."""
    choice = record["choice"]
    if precision is None or precision == choice["precision"]:
        return choice
    rows = [r for r in record.get("measured") or [] if isinstance(r, dict) and r.get("precision") == precision
            and isinstance(r.get("images_per_s"), (int, float))]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def resolve(
    manifest: Optional[Manifest],
    *,
    precision: str = "auto",
    threads: Any = "auto",
    batch: Optional[int] = None,
    device: str = "cpu",
) -> Configuration:
    """The configuration to run: the user's explicit values, the rest tuned or from the rule.

    `precision` "auto" (this machine's choice), "default" (the bundle's), "fp32" or "int8";
    `threads` "auto" or an int/None as `load` takes it; `batch` None for the choice's.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    user = [] if precision == "auto" else ["precision"]
    user += [] if threads == "auto" else ["threads"]
    user += [] if batch is None else ["batch"]
    fixed_precision = None
    if manifest is not None and precision != "auto":
        fixed_precision = manifest.default_precision if precision == "default" else precision
    warnings: list[str] = []
    base: Optional[Configuration] = None
    if manifest is not None and manifest.root is not None:
        record, warnings = read_stored(manifest, device)
        chosen = _best_stored(record, fixed_precision) if record else None
        if chosen is not None:
            base = Configuration(chosen["precision"], chosen["threads"], chosen["batch"], "tuned",
                                 f"`pneumoedge tune` on {str(record.get('created', '?'))[:10]}: "
                                 f"{chosen.get('reason') or str(chosen.get('images_per_s')) + ' images/s'}", tuple(warnings))
    if base is None:
        base = replace(rule(manifest, precision=fixed_precision), warnings=tuple(warnings))
    config = replace(
        base,
        precision=fixed_precision or base.precision,
        threads=base.threads if threads == "auto" else threads,
        batch=base.batch if batch is None else batch,
    )
    if user:
        source = "user" if len(user) == 3 else f"{base.source} + user {'/'.join(user)}"
        config = replace(config, source=source)
    for warning in config.warnings:
        log.warning("%s", warning)
    return config
