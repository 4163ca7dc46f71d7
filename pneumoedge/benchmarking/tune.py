"""`pneumoedge tune`: measure folder throughput of each candidate configuration, store the fastest.

What is measured is what `infer` runs (`predict_many`: decode + models) on X-ray-sized images;
the choice goes to the cache that `runtime.tuning.resolve` reads on every later load.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pneumoedge.benchmarking.images import write_phantoms
from pneumoedge.benchmarking.measure import load_average
from pneumoedge.bundle import Manifest, read_manifest
from pneumoedge.runtime.loading import load
from pneumoedge.runtime.machine import cpu_info
from pneumoedge.runtime.tuning import INT8_MARGIN, Configuration, int8_passed, store


@dataclass
class TuneResult:
    """What `tune` measured and chose, and where it was stored."""

    choice: Configuration
    measured: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    stored: Optional[Path]
    seconds: float
    images: int


def candidates(manifest: Manifest, cores: int) -> list[tuple[str, Optional[int], int]]:
    """(precision, threads, batch) to try, most promising first, so a short budget still compares
    both precisions and both ways of using the cores before it tries other batch sizes."""
    passed, _ = int8_passed(manifest)
    precisions = [p for p in manifest.precisions if p == "fp32" or (p == "int8" and passed)] or list(manifest.precisions)
    threads_options: list[Optional[int]] = [1, cores] if cores > 1 else [1]
    order = []
    for batch in (8, 2):
        for threads in threads_options:
            for precision in precisions:
                order.append((precision, threads, batch))
    return order


def tune(
    bundle: Any,
    *,
    device: str = "cpu",
    budget_s: float = 30.0,
    images: Optional[Sequence[Path]] = None,
    progress: Any = None,
    save: bool = True,
) -> TuneResult:
    """Measure folder throughput (decode + models, through `predict_many`) of each candidate on
    X-ray-sized images within about `budget_s` seconds; store and return the fastest.

    `images` default: generated phantoms at 1400x1200 (synthetic, timing only). Rounds over all
    candidates repeat while the budget lasts and each keeps its best figure (noise on a shared
    computer only ever slows a run down). `progress(text)` is called as candidates finish.
    """
    say = progress or (lambda text: None)
    started = time.perf_counter()
    manifest = read_manifest(bundle)
    scratch = None
    if images is None:
        scratch = tempfile.TemporaryDirectory(prefix="pneumoedge-tune-")
        images = write_phantoms(Path(scratch.name), n=8)
    try:
        cores = os.cpu_count() or 1
        todo = candidates(manifest, cores)
        stream = [images[i % len(images)] for i in range(max(16, len(images)))]
        best: dict[tuple, dict[str, Any]] = {}
        loaded: dict[tuple, Any] = {}
        rounds = 0
        while time.perf_counter() - started < budget_s and rounds < 3:
            rounds += 1
            for precision, threads, batch in todo:
                # Over budget: stop, once each precision has one figure (the first candidates).
                if time.perf_counter() - started >= budget_s and len(best) >= min(2, len(todo)):
                    break
                key = (precision, threads)
                if key not in loaded:
                    loaded.clear()  # one ensemble's sessions at a time: memory stays that of one model
                    loaded[key] = load(bundle, device=device, precision=precision, threads=threads)
                ensemble = loaded[key]
                for _ in ensemble.predict_many(stream[:batch], batch_size=batch):
                    pass  # warm-up: first runs allocate
                load_avg = load_average()
                t0 = time.perf_counter()
                ok = sum(p.status == "ok" for p in ensemble.predict_many(stream, batch_size=batch))
                seconds = time.perf_counter() - t0
                row = {"precision": precision, "threads": threads, "runners": Configuration(precision, threads, batch, "", "").runners,
                       "batch": batch, "images": len(stream), "ok": ok, "seconds": round(seconds, 4),
                       "images_per_s": round(len(stream) / seconds, 2), "load_average": load_avg}
                old = best.get((precision, threads, batch))
                if old is None or row["images_per_s"] > old["images_per_s"]:
                    best[(precision, threads, batch)] = row
                say(f"{precision} threads {threads} batch {batch}: {row['images_per_s']:.1f} images/s (load {load_avg})")
        loaded.clear()
        measured = list(best.values())
        skipped = [{"precision": p, "threads": t, "batch": b} for p, t, b in todo if (p, t, b) not in best]
        choice = choose(measured)
        path = store(manifest, device, choice, measured, rounds=rounds, budget_s=budget_s, cpu_flags=cpu_info().flags_text) if save else None
        return TuneResult(choice, measured, skipped, path, time.perf_counter() - started, len(stream))
    finally:
        if scratch is not None:
            scratch.cleanup()


def choose(measured: list[dict[str, Any]]) -> Configuration:
    """The fastest row; int8 only when it beats the fastest fp32 by `INT8_MARGIN`."""
    if not measured:
        raise ValueError("nothing was measured (budget too small?)")
    fastest = max(measured, key=lambda r: r["images_per_s"])
    fp32 = [r for r in measured if r["precision"] == "fp32"]
    reason = f"{fastest['images_per_s']:.1f} images/s"
    if fastest["precision"] == "int8" and fp32:
        best_fp32 = max(fp32, key=lambda r: r["images_per_s"])
        if fastest["images_per_s"] < best_fp32["images_per_s"] * (1 + INT8_MARGIN):
            reason = f"int8 {fastest['images_per_s']:.1f} vs fp32 {best_fp32['images_per_s']:.1f} images/s: within {INT8_MARGIN:.0%}, fp32 kept"
            fastest = best_fp32
        else:
            reason = f"int8 {fastest['images_per_s']:.1f} vs fp32 {best_fp32['images_per_s']:.1f} images/s"
    return Configuration(fastest["precision"], fastest["threads"], fastest["batch"], "tuned", reason)

