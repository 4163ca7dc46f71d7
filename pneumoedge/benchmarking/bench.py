"""`pneumoedge bench`: latency, throughput and memory of a model on this computer (onnxruntime only).

The figure set follows onnxruntime_perf_test, OpenVINO's benchmark_app and TFLite's
benchmark_model, so users can compare: session creation, first inference, model-only
latency statistics over N runs after warm-up, the preprocessing/model split, end-to-end
latency per image, folder throughput through the real `predict_many` pipeline, peak
resident memory, provider, machine and library versions. `run_bench` returns a plain dict
whose layout is versioned by `SCHEMA` (documented in `BENCH_SCHEMA_DOC`).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.benchmarking.measure import BenchError, library_versions, machine_info, peak_rss_mb, summarize, time_calls
from pneumoedge.explain.overlay import encode_png
from pneumoedge.preprocessing import to_tensor
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.folder import overlay_writer
from pneumoedge.runtime.loading import ModelRef, load
from pneumoedge.runtime.results import ResultWriter
from pneumoedge.runtime.sessions import create_session

#: Version of the JSON layout below; bump it when a key changes meaning or disappears.
SCHEMA = "pneumoedge.bench/1"

BENCH_SCHEMA_DOC = """\
{"schema": "pneumoedge.bench/1", "created": ISO-8601 UTC, "command": [argv],
 "machine": {cpu, simd ("avx2 avx512_vnni ..."), fast_int8, physical_cores, logical_cores, os, python},
 "versions": {pneumoedge, onnxruntime, numpy, opencv},
 "settings": {model, device, threads, batch, precision, runs, warmup, images, images_source, megapixels_mean},
 "members": [{name, precision, source, input_shape, provider, session_create_ms, first_inference_ms,
              preprocess_ms: STATS, model_only_ms: STATS (batch 1), model_only_batch_ms: STATS|null (per --batch run)}],
 "ensemble": {load_ms, first_inference_ms, provider, decode_reductions,
              decode_ms: STATS, tensors_ms: STATS, model_only_ms: STATS, end_to_end_ms: STATS,
              split: {decode_fraction, tensors_fraction, model_fraction},
              throughput: {images, batch, seconds, images_per_s},
              explain: null (model without heatmaps) | {end_to_end_ms: STATS (predict with explain=True, overlay
                       rendered and PNG-encoded), predict_ms: STATS (predict with explain=True, no overlay),
                       overlay_ms: STATS (rendering + PNG only), throughput: {images, batch, seconds, images_per_s} (overlays
                       written to a temporary folder, as `infer --heatmaps`), overlay_side,
                       end_to_end_ratio (median explain / median plain), throughput_ratio (plain / explain)},
              ood: null (no statistics) | {with_ood_ms: STATS, without_ood_ms: STATS (all members, batch 1: the
                   features output fetched and scored, or not), cost_ms (median difference),
                   score_ms: STATS (the distances alone, batch 1), fraction_of_end_to_end},
              stages_ms: {decode, preprocess, model, ood, heatmap, overlay, row}: one image's milliseconds per stage
                   (batch 1, medians; ood = score_ms, heatmap = explain predict minus plain predict;
                   null where the model has no such stage)},
 "memory": {peak_rss_mb}}
STATS = {count, min, mean, std, p50, p90, p95, p99, max} in milliseconds."""

@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how often."""

    device: str = "cpu"
    threads: Optional[int] = None
    batch: int = 8
    precision: str = "auto"
    runs: int = 50
    warmup: int = 5
    #: Folder throughput runs over at least this many images (the files are cycled).
    throughput_images: int = 64

    def check(self) -> None:
        for name in ("batch", "runs"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {self.threads}")


def _member_figures(ensemble: Ensemble, decoded: list[dict], settings: BenchSettings) -> list[dict[str, Any]]:
    figures = []
    for k, member in enumerate(ensemble.members):
        spec = member.card.spec
        start = time.perf_counter()
        fresh = create_session(member.source, settings.device, settings.threads)
        created = time.perf_counter() - start
        tensors = [ensemble.tensors(d)[k] for d in decoded]
        feed_name = fresh.get_inputs()[0].name
        start = time.perf_counter()
        fresh.run(None, {feed_name: tensors[0][None]})
        first = time.perf_counter() - start
        del fresh
        key = spec.decode_key
        pre = time_calls(lambda i: to_tensor(decoded[i % len(decoded)][key], spec), settings.runs, 1)
        singles = [t[None] for t in tensors]
        run = member.session.run
        name = member.input_name
        model_only = time_calls(lambda i: run(None, {name: singles[i % len(singles)]}), settings.runs, settings.warmup)
        batched = None
        if settings.batch > 1 and member.dynamic_batch:
            batch = np.ascontiguousarray(np.stack(list(itertools.islice(itertools.cycle(tensors), settings.batch))))
            batched = summarize(time_calls(lambda i: run(None, {name: batch}), settings.runs, settings.warmup))
        figures.append(
            {
                "name": member.name,
                "precision": member.precision,
                "source": member.source,
                "input_shape": list(spec.input_shape),
                "decode_reduction": spec.decode_reduction,
                "provider": member.provider,
                "session_create_ms": created * 1000.0,
                "first_inference_ms": first * 1000.0,
                "preprocess_ms": summarize(pre),
                "model_only_ms": summarize(model_only),
                "model_only_batch_ms": batched,
            }
        )
    return figures


def _throughput(ensemble: Ensemble, images: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    count = max(settings.throughput_images, len(images))
    stream = list(itertools.islice(itertools.cycle(images), count))
    start = time.perf_counter()
    done = sum(1 for p in ensemble.predict_many(stream, batch_size=settings.batch) if p.status == "ok")
    seconds = time.perf_counter() - start
    return {"images": count, "ok": done, "batch": settings.batch, "seconds": seconds, "images_per_s": count / seconds}


def _ood_figures(ensemble: Ensemble, singles: Sequence[Sequence[np.ndarray]], settings: BenchSettings, plain_e2e: Sequence[float]) -> Optional[dict[str, Any]]:
    """What the out-of-distribution score adds to a prediction: its features fetched and scored."""
    if not ensemble.can_flag_ood:
        return None
    stats = ensemble.ood_stats
    n = len(singles)

    def with_ood(i: int) -> None:
        for member, batch, member_stats in zip(ensemble.members, singles[i % n], stats):
            _, _, features = member.run_outputs(batch, features=member_stats is not None)
            if member_stats is not None:
                member_stats.distances(features)

    def without(i: int) -> None:
        for member, batch in zip(ensemble.members, singles[i % n]):
            member.run_outputs(batch)

    features = [[m.run_outputs(b, features=s is not None)[2] for m, b, s in zip(ensemble.members, single, stats)] for single in singles]

    def score(i: int) -> None:
        for member_stats, member_features in zip(stats, features[i % n]):
            if member_stats is not None:
                member_stats.distances(member_features)

    on = time_calls(with_ood, settings.runs, settings.warmup)
    off = time_calls(without, settings.runs, settings.warmup)
    scoring = time_calls(score, settings.runs, 1)
    cost = max(0.0, float(np.median(on) - np.median(off)))
    return {"with_ood_ms": summarize(on), "without_ood_ms": summarize(off), "cost_ms": cost * 1000.0,
            "score_ms": summarize(scoring), "fraction_of_end_to_end": cost / float(np.median(plain_e2e))}


def _explain_figures(ensemble: Ensemble, images: Sequence[Path], settings: BenchSettings, plain_e2e: Sequence[float], plain_tp: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Explain mode beside the plain figures: heatmaps, overlay and PNG included."""
    if not ensemble.can_explain:
        return None
    side = 768  # infer --heatmaps' default
    n = len(images)
    e2e = time_calls(lambda i: encode_png(ensemble.predict(images[i % n], explain=True).overlay(side)), settings.runs, settings.warmup)
    explained = [ensemble.predict(path, explain=True) for path in images]
    predict = time_calls(lambda i: ensemble.predict(images[i % n], explain=True), settings.runs, 1)
    overlay = time_calls(lambda i: encode_png(explained[i % n].overlay(side)), settings.runs, 1)
    count = max(settings.throughput_images, n)
    stream = list(itertools.islice(itertools.cycle(images), count))
    with tempfile.TemporaryDirectory(prefix="pneumoedge-bench-overlays-") as tmp:
        writer = overlay_writer([Path(tmp)], Path(tmp) / "overlays", side)
        start = time.perf_counter()
        done = sum(1 for p in ensemble.predict_many(stream, batch_size=settings.batch, explain=True, postprocess=writer) if p.status == "ok")
        seconds = time.perf_counter() - start
    throughput = {"images": count, "ok": done, "batch": settings.batch, "seconds": seconds, "images_per_s": count / seconds}
    return {
        "end_to_end_ms": summarize(e2e),
        "predict_ms": summarize(predict),
        "overlay_ms": summarize(overlay),
        "throughput": throughput,
        "overlay_side": side,
        "end_to_end_ratio": float(np.median(e2e) / np.median(plain_e2e)),
        "throughput_ratio": float(plain_tp["images_per_s"] / throughput["images_per_s"]),
    }


def _row_seconds(ensemble: Ensemble, images: Sequence[Path], runs: int) -> list[float]:
    """Writing one result row (CSV, as `infer` does) to a file."""
    predictions = [ensemble.predict(path) for path in images[:4]]
    writer = ResultWriter("csv", ensemble.labels, [m.name for m in ensemble.members])
    with tempfile.TemporaryDirectory(prefix="pneumoedge-bench-rows-") as tmp:
        writer.open(Path(tmp) / "rows.csv", overwrite=True)
        try:
            return time_calls(lambda i: writer.write(predictions[i % len(predictions)]), runs, 1)
        finally:
            writer.close()


def stages(ensemble_figures: dict[str, Any], row_ms: float) -> dict[str, Optional[float]]:
    """Where each millisecond of one image goes (batch 1, medians): decode, preprocess, model,
    out-of-distribution score, heatmap, overlay PNG, result row. None: the model has no such stage."""
    e = ensemble_figures
    ood, explain = e.get("ood"), e.get("explain")
    heatmap = overlay = None
    if explain:
        overlay = explain["overlay_ms"]["p50"]
        heatmap = max(0.0, explain["predict_ms"]["p50"] - e["end_to_end_ms"]["p50"])
    return {
        "decode": e["decode_ms"]["p50"],
        "preprocess": e["tensors_ms"]["p50"],
        "model": e["model_only_ms"]["p50"],
        "ood": ood["score_ms"]["p50"] if ood else None,
        "heatmap": heatmap,
        "overlay": overlay,
        "row": row_ms,
    }


def _ensemble_figures(ensemble: Ensemble, images: Sequence[Path], decoded: list[dict], settings: BenchSettings) -> dict[str, Any]:
    n = len(images)
    decode_t = time_calls(lambda i: ensemble.decode(images[i % n]), settings.runs, 1)
    tensors_t = time_calls(lambda i: ensemble.tensors(decoded[i % n]), settings.runs, 1)
    singles = [[t[None] for t in ensemble.tensors(d)] for d in decoded]
    model_t = time_calls(lambda i: ensemble.run_tensors(singles[i % n]), settings.runs, settings.warmup)
    e2e_t = time_calls(lambda i: ensemble.predict(images[i % n]), settings.runs, settings.warmup)
    parts = {"decode": float(np.median(decode_t)), "tensors": float(np.median(tensors_t)), "model": float(np.median(model_t))}
    total = sum(parts.values()) or 1.0
    throughput = _throughput(ensemble, images, settings)
    figures = {
        "provider": ensemble.provider,
        "decode_reductions": sorted({m.card.spec.decode_reduction for m in ensemble.members}),
        "decode_ms": summarize(decode_t),
        "tensors_ms": summarize(tensors_t),
        "model_only_ms": summarize(model_t),
        "end_to_end_ms": summarize(e2e_t),
        "split": {f"{k}_fraction": v / total for k, v in parts.items()},
        "throughput": throughput,
        "explain": _explain_figures(ensemble, images, settings, e2e_t, throughput),
        "ood": _ood_figures(ensemble, singles, settings, e2e_t),
    }
    figures["stages_ms"] = stages(figures, float(np.median(_row_seconds(ensemble, images, settings.runs))) * 1000.0)
    return figures


def run_bench(
    model: Union[ModelRef, Sequence[ModelRef], None],
    images: Sequence[Path],
    settings: BenchSettings,
    *,
    command: Optional[Sequence[str]] = None,
    images_source: str = "",
) -> dict[str, Any]:
    """Measure `model` on `images`; return the figures as a dict (layout `SCHEMA`)."""
    settings.check()
    if not images:
        raise BenchError("no images to benchmark")
    start = time.perf_counter()
    ensemble = load(model, device=settings.device, precision=settings.precision, threads=settings.threads)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    ensemble.predict(images[0])
    first_s = time.perf_counter() - start

    decoded = [ensemble.decode(p) for p in images]  # raises ImageError for a bad file: bench needs readable images
    megapixels = float(np.mean([next(iter(d.values())).shape[0] * next(iter(d.values())).shape[1] for d in decoded])) / 1e6
    members = _member_figures(ensemble, decoded, settings)
    figures = _ensemble_figures(ensemble, images, decoded, settings)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else list(sys.argv),
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": {
            "model": "default bundle" if model is None else [str(m) for m in model] if isinstance(model, (list, tuple)) else str(model),
            "device": settings.device,
            "threads": settings.threads,
            "batch": settings.batch,
            "precision": settings.precision,
            "runs": settings.runs,
            "warmup": settings.warmup,
            "images": len(images),
            "images_source": images_source,
            "megapixels_mean": megapixels,
        },
        "members": members,
        "ensemble": {"load_ms": load_s * 1000.0, "first_inference_ms": first_s * 1000.0, **figures},
        "memory": {"peak_rss_mb": peak_rss_mb()},
    }
