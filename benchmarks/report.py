"""RESULTS.md from compare.py's results: every figure here is read from the measurements."""

from __future__ import annotations

from typing import Any, Optional

LABELS = {
    "founding": "founding way: PIL + Keras `model.predict` per image",
    "keras": "Keras `model(x, training=False)`",
    "tflite_fp32": "TFLite/LiteRT fp32 (XNNPACK)",
    "tflite_int8": "TFLite/LiteRT full-integer int8 (XNNPACK)",
}

#: Memory counts as flat when the second half's peak RSS is no more than this above the first half's
#: (after the first tenth, which fills arenas and the look-ahead window). Peaks, not a fitted slope:
#: RSS jitters by tens of MiB from batch to batch, and a slope over that jitter says nothing.
FLAT_MARGIN_MB = 5.0


def _halves(fl: dict) -> tuple[Optional[float], Optional[float]]:
    """Peak RSS of the first and second half of the settled samples."""
    samples = fl.get("samples") or []
    settled = samples[len(samples) // 10 :]
    if len(settled) < 2:
        return None, None
    half = len(settled) // 2
    return max(m for _, m in settled[:half]), max(m for _, m in settled[half:])


def _get(d: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _f(value: Optional[float], digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _label(key: str) -> str:
    if key.startswith("pneumoedge_"):
        _, precision, threads = key.split("_")
        return f"**pneumoedge onnxruntime {precision}**, {threads[1:]} thread{'s' if threads != 't1' else ''}"
    return LABELS.get(key, key)


def _ref_key(r: dict) -> str:
    return f"pneumoedge_int8_t{r['settings']['threads']}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def render(r: dict[str, Any]) -> str:
    """The whole RESULTS.md."""
    parts = [_header(r), _headline(r), _models(r), _targets(r), _end_to_end(r), _model_only(r), _cold(r), _installed(r), _compute(r),
             _flatness(r), _speed_work(r), _agreement(r)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(r: dict) -> str:
    m, v, s = r["machine"], r["versions"], r["settings"]
    busy = r.get("note") or ""
    return "\n".join([
        "# pneumoedge vs Keras vs TFLite: side-by-side latency on one machine",
        "",
        f"- **Date**: {r['created']} (UTC); run took {r['elapsed_s']:.0f} s; mode: {'QUICK (reduced, not for quoting)' if s['quick'] else 'full'}",
        f"- **Command**: `{r['command']}`",
        f"- **Conditions**: {busy or 'no note given'}; load average (1, 5, 15 min) at start {r.get('load_average_start')}, at end {r.get('load_average_end')}, "
        f"highest 1-min value seen between measurements {r.get('load_average_1min_max')} (this run's own work adds 1-2 on {m['logical_cores']} cores)",
        f"- **Machine**: {m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores, {m['os']}, Python {m['python']}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Images**: {s['images']} generated phantoms (synthetic, not patients) at {s['size'][0]}x{s['size'][1]} px (height x width ranges), "
        f"{int(s['sixteen_bit_fraction'] * 100)}% 16-bit PNG, the rest JPEG; every runtime reads the same files",
        f"- **Protocol**: each runtime in its own fresh process, one after another; {s['runs']} timed runs after {s['warmup']} warm-up per figure; "
        f"medians (p50) unless said; batched figures use batch {s['batch']}; folder throughput over {s['throughput_images']} images; "
        f"'all threads' = {s['threads']}",
        "- **End to end** = read file + decode + preprocess + both models + average, per image, for every runtime. Keras `model(x)` and "
        "TFLite use pneumoedge's preprocessing function (so only the model runtime differs); the founding way uses PIL as its projects did "
        "(`Image.open(...).convert('L').resize((w, h))` with PIL's default filter, then `/255`).",
    ])


def _headline(r: dict) -> str:
    ref = _ref_key(r)
    tp = _throughput(r, ref)
    best = max(((k, _throughput(r, k)) for k in r["runtimes"] if k.startswith("pneumoedge_") and _throughput(r, k)), key=lambda kv: kv[1], default=(None, None))
    cold, keras_cold = _get(r, "cold_start", "pneumoedge_python_int8", "seconds_median"), _get(r, "cold_start", "keras_founding", "seconds_median")
    size, tf_size = _get(r, "installed", "runtime", "total_mb"), _get(r, "installed", "with_tensorflow", "total_mb")
    lines = ["## Headline", "",
             f"- Default bundle's two-member ensemble at int8 (the issue's target configuration), folder throughput {_f(tp)} images/s: **{_f(_ratio(tp, _throughput(r, 'founding')))}x** the founding way, "
             f"**{_f(_ratio(tp, _throughput(r, 'keras')))}x** Keras `model(x)`, **{_f(_ratio(tp, _throughput(r, 'tflite_int8')), 2)}x** TFLite int8, "
             f"**{_f(_ratio(tp, _throughput(r, 'tflite_fp32')), 2)}x** TFLite fp32."]
    if best[0] and best[0] != ref:
        lines.append(f"- The fastest pneumoedge configuration here was {_label(best[0])}: {_f(best[1])} images/s.")
    lines.append(f"- Cold start to first result: pneumoedge {_f(cold, 2)} s vs Keras {_f(keras_cold, 2)} s (**{_f(_ratio(keras_cold, cold))}x**); "
                 f"installed size {_f(size, 0)} MB vs {_f(tf_size, 0)} MB with TensorFlow (**{_f(_ratio(tf_size, size))}x** smaller).")
    return "\n".join(lines)


def _models(r: dict) -> str:
    lines = ["## Models", ""]
    b = r["bundle"]
    lines.append(f"Bundle `{b['path']}` ({b['name']}), default precision {b['default_precision']}, "
                 f"decode_reduction {b['decode_reduction']} (1 = full-resolution JPEG decode); checkout {r.get('git_commit') or 'not recorded'}.")
    if b.get("members"):
        lines.append("Member files (sha256 prefix): " + ", ".join(f"`{f}` {h}" for f, h in b["members"].items()) + ".")
    lines.append("")
    lines.append("| model | Keras source | same arch & input as the ONNX | MACs / image | parameters (Keras) |")
    lines.append("| --- | --- | --- | --- | --- |")
    for name, check in r["keras_runs"].items():
        source = f"run `{check['keras']}`" if check["keras"] else "**untrained stand-in** of the same architecture (no run found; fp32 latency does not depend on weight values)"
        same = "yes" if check.get("same_input") and check.get("same_arch") else "n/a (no run)" if not check["keras"] else (
            "**NO**: " + ", ".join(f"{k} {run} (run) vs {onnx} (bundle)" for k, (run, onnx) in (check.get("differs") or {}).items())
            + ("" if check.get("same_arch") else f" arch {check.get('arch')}"))
        macs = _get(r, "flops", name, "macs")
        params = _get(r, "runtimes", "keras", "params", name)
        lines.append(f"| {name} | {source} | {same} | {_f(macs and macs / 1e6, 1)} M | {params if params is not None else 'n/a'} |")
    return "\n".join(lines)


def _throughput(r: dict, key: str) -> Optional[float]:
    return _get(r, "runtimes", key, "throughput", "images_per_s")


def _targets(r: dict) -> str:
    ref = _ref_key(r)
    rows = ["## Targets (default two-member ensemble, int8, all threads)", "", "| target | measured | met? | what bounds it |", "| --- | --- | --- | --- |"]
    tp, founding, tfl = _throughput(r, ref), _throughput(r, "founding"), _throughput(r, "tflite_int8")
    prepare = _get(r, "runtimes", ref, "prepare_ms", "p50")
    models = _get(r, "runtimes", ref, "ensemble_b1_ms", "p50")
    one = _get(r, "runtimes", "pneumoedge_int8_t1") or {}
    cpu_ms = (_get(one, "prepare_ms", "p50") or 0) + (_get(one, "models", r["settings"]["models"][-1], "batch_ms", "p50") or 0) / r["settings"]["batch"]
    cpu_ms += sum((_get(one, "models", n, "batch_ms", "p50") or 0) / r["settings"]["batch"] for n in r["settings"]["models"][:-1])
    ceiling = r["settings"]["threads"] * 1000.0 / cpu_ms if cpu_ms else None
    bound = (f"CPU work per image (1 thread, p50): read+decode+preprocess {_f(_get(one, 'prepare_ms', 'p50'))} ms + models (batch "
             f"{r['settings']['batch']}) {_f(cpu_ms - (_get(one, 'prepare_ms', 'p50') or 0))} ms, so {r['settings']['threads']} cores cannot pass "
             f"about {_f(ceiling)} images/s; read + decode + preprocess is the larger share")
    if cpu_ms and _get(one, "prepare_ms", "p50") and _get(one, "prepare_ms", "p50") < cpu_ms / 2:
        bound = bound.replace("read + decode + preprocess is the larger share", "the models are the larger share")
    x = _ratio(tp, founding)
    rows.append(_target_row(f"folder throughput >= 20x the founding way", f"{_f(tp)} vs {_f(founding)} images/s = **{_f(x)}x**", x, 20.0, bound))
    x = _ratio(tp, tfl)
    e2e_ref, e2e_tfl = _get(r, "runtimes", ref, "end_to_end_ms", "p50"), _get(r, "runtimes", "tflite_int8", "end_to_end_ms", "p50")
    rows.append(_target_row("ahead of TFLite int8 end to end", f"throughput {_f(tp)} vs {_f(tfl)} images/s = **{_f(x, 2)}x**; per image p50 {_f(e2e_ref)} vs {_f(e2e_tfl)} ms", x, 1.0,
                            f"same preprocessing function on both sides; models only (both, batch 1 p50): pneumoedge int8 {_f(models, 2)} ms vs TFLite int8 "
                            f"{_f(_get(r, 'runtimes', 'tflite_int8', 'ensemble_b1_ms', 'p50'), 2)} ms; pneumoedge's folder run overlaps decoding with inference, the TFLite loop does not"))
    fp32 = _get(r, "runtimes", ref.replace("int8", "fp32"), "ensemble_b1_ms", "p50")
    x = _ratio(fp32, models)
    rows.append(_target_row("int8 >= 1.5x fp32, model only", f"both models batch 1: fp32 {_f(fp32, 2)} ms vs int8 {_f(models, 2)} ms = **{_f(x, 2)}x**", x, 1.5,
                            _int8_bound(r) if x is not None and x < 1.5 else ""))
    cold = _get(r, "cold_start", "pneumoedge_python_int8", "seconds_median")
    rows.append(_target_row("cold start < 1 s (fresh process to first result)", f"**{_f(cold, 2)} s** (python -c load + predict)", None if cold is None else 1.0 / cold, 1.0,
                            "interpreter start + imports (onnxruntime, numpy, cv2) + 2 session creations + first run"))
    fl = r.get("flatness") or {}
    first, second = _halves(fl)
    flat = None if first is None else (2.0 if second - first <= FLAT_MARGIN_MB else 0.0)
    rows.append(_target_row(f"peak memory flat over {fl.get('images', 'n/a')} images",
                            f"peak RSS first half {_f(first)} MiB, second half {_f(second)} MiB (flat: second <= first + {FLAT_MARGIN_MB:.0f}); "
                            f"end {_f(fl.get('rss_end_mb'))} MiB", flat, 1.0,
                            "bounded look-ahead window in predict_many; RSS jitters by batch (range in the memory section)"))
    return "\n".join(rows)


def _int8_bound(r: dict) -> str:
    flags = r["machine"].get("cpu_flags") or []
    vnni = [f for f in flags if "vnni" in f]
    if vnni:
        return f"CPU has {', '.join(vnni)}; see the model-only table for where the time goes"
    ops = r.get("optimized_ops") or {}
    overhead = {k: {op: n for op, n in v.items() if op in ("QuantizeLinear", "DequantizeLinear", "Transpose", "Conv")} for k, v in ops.items() if k.endswith("int8")}
    gemm = _ratio(_get(r, "gemm", "all_cores", "onnxruntime", "MatMulInteger", "gops"), _get(r, "gemm", "all_cores", "onnxruntime", "MatMul", "gops"))
    return ("this CPU has no VNNI instructions (SIMD flags: " + ", ".join(flags) + "); onnxruntime's int8 GEMM (MatMulInteger) "
            f"reaches {_f(gemm, 2)}x its fp32 GEMM here (compute-bound reference below); the int8 graphs as onnxruntime runs them still hold "
            + "; ".join(f"{k}: {v}" for k, v in overhead.items()) + " (fp32 Conv = nodes left unquantized)")


def _target_row(name: str, measured: str, value: Optional[float], goal: float, bound: str) -> str:
    met = "n/a" if value is None else ("**met**" if value >= goal else "**not met**")
    return f"| {name} | {measured} | {met} | {bound} |"


def _end_to_end(r: dict) -> str:
    ref_tp = _throughput(r, _ref_key(r))
    rows = ["## End to end (same image files)", "",
            "| runtime | per image p50 ms | p90 ms | folder images/s | pneumoedge int8 is ...x faster | peak RSS MiB |",
            "| --- | --- | --- | --- | --- | --- |"]
    for key, res in r["runtimes"].items():
        if "error" in res:
            rows.append(f"| {_label(key)} | failed: {res['error']} | | | | |")
            continue
        tp = _get(res, "throughput", "images_per_s")
        rows.append(f"| {_label(key)} | {_f(_get(res, 'end_to_end_ms', 'p50'))} | {_f(_get(res, 'end_to_end_ms', 'p90'))} | "
                    f"{_f(tp)} (batch {_get(res, 'throughput', 'batch')}) | {_f(_ratio(ref_tp, tp), 2)} | {_f(res.get('peak_rss_mb'), 0)} |")
    rows.append("")
    rows.append("pneumoedge's folder figure is `predict_many` (decode threads + batching); the others are a plain loop "
                "(founding: one image at a time; Keras/TFLite: preprocess a batch, then run it).")
    return "\n".join(rows)


def _model_only(r: dict) -> str:
    names = r["settings"]["models"]
    b = r["settings"]["batch"]
    ref = _get(r, "runtimes", _ref_key(r), "ensemble_b1_ms", "p50")
    head = " | ".join(f"{n} b1 p50 ms | {n} b{b} ms/image" for n in names)
    rows = ["## Model only (tensors ready, no decode)", "", f"| runtime | {head} | all models b1 p50 ms | pneumoedge int8 is ...x faster |",
            "| --- |" + " --- |" * (2 * len(names) + 2)]
    for key, res in r["runtimes"].items():
        if "error" in res:
            continue
        cells = []
        for n in names:
            cells.append(_f(_get(res, "models", n, "b1_ms", "p50"), 2))
            batch = _get(res, "models", n, "batch_ms", "p50")
            cells.append(_f(batch and batch / b, 2))
        both = _get(res, "ensemble_b1_ms", "p50")
        rows.append(f"| {_label(key)} | {' | '.join(cells)} | {_f(both, 2)} | {_f(_ratio(both, ref), 2)} |")
    return "\n".join(rows)


def _cold(r: dict) -> str:
    rows = ["## Cold start (fresh process: launch to first result) and its peak memory", "",
            "| process | median s | min s | peak RSS MiB | launches |", "| --- | --- | --- | --- | --- |"]
    for key, res in (r.get("cold_start") or {}).items():
        if "error" in res:
            rows.append(f"| {key} | failed: {res['error']} | | | |")
        else:
            rows.append(f"| {key} | {_f(res['seconds_median'], 2)} | {_f(res['seconds_min'], 2)} | {_f(res['peak_rss_mb'], 0)} | {res['launches']} |")
    rows.append("")
    rows.append("One untimed launch first (files in the OS cache, as on a workstation used daily). "
                "keras_founding: import Keras/TensorFlow, load both models, PIL preprocess, `predict`.")
    return "\n".join(rows)


def _installed(r: dict) -> str:
    i = r.get("installed") or {}
    rows = ["## Installed size", "",
            "Sum of the files in each installed distribution's RECORD, over the dependency closure (pneumoedge itself: its package and bundled model).", "",
            "| environment | MB | distributions | largest |", "| --- | --- | --- | --- |"]
    for label, key in (("runtime (`pip install pneumoedge`)", "runtime"), ("runtime + TensorFlow", "with_tensorflow")):
        env = i.get(key, {})
        largest = ", ".join(f"{k} {v:.0f}" for k, v in (env.get("largest") or {}).items())
        rows.append(f"| {label} | {_f(env.get('total_mb'), 0)} | {env.get('distributions')} | {largest} |")
    return "\n".join(rows)


def _compute(r: dict) -> str:
    g_all, g_one = _get(r, "gemm", "all_cores", "gflops"), _get(r, "gemm", "one_core", "gflops")
    b = r["settings"]["batch"]
    rows = ["## Compute-bound reference", "",
            f"Peak: numpy float32 GEMM {_get(r, 'gemm', 'all_cores', 'size')}^2, best of {_get(r, 'gemm', 'all_cores', 'runs')}: "
            f"**{_f(g_all)} GFLOP/s** all cores, **{_f(g_one)} GFLOP/s** one core.", "",
            "onnxruntime's own GEMMs, same size (what fp32 and int8 convolutions reduce to), GOP/s all cores / one core: "
            + ", ".join(f"{kind} {_f(_get(r, 'gemm', 'all_cores', 'onnxruntime', kind, 'gops'))} / {_f(_get(r, 'gemm', 'one_core', 'onnxruntime', kind, 'gops'))}"
                        for kind in ("MatMul", "MatMulInteger"))
            + f" (int8/fp32 ratio, all cores: **{_f(_ratio(_get(r, 'gemm', 'all_cores', 'onnxruntime', 'MatMulInteger', 'gops'), _get(r, 'gemm', 'all_cores', 'onnxruntime', 'MatMul', 'gops')), 2)}x**: "
            "the most int8 can gain over fp32 on this CPU in onnxruntime).", "",
            "Model FLOPs (2 x MACs of Conv/MatMul/Gemm from the ONNX graph, one image): "
            + ", ".join(f"{n} {v['flops'] / 1e9:.3f} GFLOP" for n, v in (r.get("flops") or {}).items()) + ".", "",
            f"Achieved GFLOP/s at batch {b} (model only) and the fraction of the all-core fp32 GEMM peak:", "",
            "| runtime | " + " | ".join(r.get("flops", {})) + " |", "| --- |" + " --- |" * len(r.get("flops", {}))]
    for key, res in r["runtimes"].items():
        if "error" in res:
            continue
        cells = []
        peak = g_one if key.endswith("_t1") else g_all
        for n, f in (r.get("flops") or {}).items():
            t = _get(res, "models", n, "batch_ms", "p50")
            gf = f["flops"] * b / (t / 1000.0) / 1e9 if t else None
            cells.append(f"{_f(gf)} ({_f(_ratio(gf, peak) and 100 * gf / peak, 0)}%)")
        rows.append(f"| {_label(key)} | {' | '.join(cells)} |")
    rows.append("")
    rows.append("1-thread rows are a fraction of the one-core peak. The reference is numpy's measured fp32 GEMM, a practical peak, not "
                "the CPU's theoretical one: a runtime's convolution kernels (or int8 arithmetic) can pass it, which shows as more than 100%.")
    return "\n".join(rows)


def _flatness(r: dict) -> str:
    fl = r.get("flatness") or {}
    if "error" in fl or not fl:
        return f"## Memory over a long run\n\nfailed: {fl.get('error')}"
    samples = fl.get("samples") or []
    picks = samples[:: max(1, len(samples) // 10)] + samples[-1:]
    return "\n".join([
        "## Memory over a long run", "",
        f"`predict_many` (int8, batch {r['settings']['batch']}) over {fl['images']} images (the files cycled), {_f(fl['images_per_s'])} images/s: "
        f"RSS after the first image {_f(fl['rss_first_mb'])} MiB, after {fl['start_after_images']} images {_f(fl['rss_start_mb'])} MiB, end {_f(fl['rss_end_mb'])} MiB, peak {_f(fl['rss_peak_mb'])} MiB; "
        f"settled samples range {_f(min(m for _, m in samples[len(samples) // 10:]))}-{_f(max(m for _, m in samples[len(samples) // 10:]))} MiB; "
        f"least-squares slope over the second half {_f(fl['growth_second_half_mb_per_1000'], 2)} MiB per 1000 images.", "",
        "images: " + ", ".join(f"{i}: {m:.0f}" for i, m in picks) + " (MiB)",
    ])


def _speed_work(r: dict) -> str:
    rows = ["## Speed work: before / after (same process, same inputs)", "",
            "Session options: onnxruntime defaults vs pneumoedge's (`ORT_ENABLE_ALL`, sequential, inter-op 1, explicit intra-op threads); model only, batch 1, p50 ms.", "",
            "| configuration | model | defaults | pneumoedge | gain |", "| --- | --- | --- | --- | --- |"]
    for key, res in r["runtimes"].items():
        plain = res.get("default_session_options_b1_ms") if isinstance(res, dict) else None
        for name, stats in (plain or {}).items():
            ours = _get(res, "models", name, "b1_ms", "p50")
            rows.append(f"| {_label(key)} | {name} | {_f(stats['p50'], 2)} | {_f(ours, 2)} | {_f(_ratio(stats['p50'], ours), 2)}x |")
    rows += ["", "Idle onnxruntime threads: spinning (onnxruntime's default) vs sleeping (pneumoedge's `ALLOW_SPINNING = False`); "
             "model only batch 1 p50 ms, and `predict_many` images/s:", "",
             "| configuration | model | spinning | sleeping | gain |", "| --- | --- | --- | --- | --- |"]
    for key, res in r["runtimes"].items():
        spin = res.get("spinning") if isinstance(res, dict) else None
        if not spin:
            continue
        for name, stats in spin["b1_ms"].items():
            ours = _get(res, "models", name, "b1_ms", "p50")
            rows.append(f"| {_label(key)} | {name} | {_f(stats['p50'], 2)} | {_f(ours, 2)} | {_f(_ratio(stats['p50'], ours), 2)}x |")
        ours = _get(res, "throughput", "images_per_s")
        rows.append(f"| {_label(key)} | folder images/s | {_f(spin['images_per_s'])} | {_f(ours)} | {_f(_ratio(ours, spin['images_per_s']), 2)}x |")
    control = [_ratio(_get(res, "spinning", "b1_ms", n, "p50"), _get(res, "models", n, "b1_ms", "p50"))
               for key, res in r["runtimes"].items() if key.endswith("_t1") and isinstance(res, dict) and res.get("spinning")
               for n in res["spinning"]["b1_ms"]]
    control = [c for c in control if c]
    if control:
        rows += ["", f"With 1 thread onnxruntime has no thread pool to spin, so the 1-thread model rows are a control: their 'gains' "
                 f"({min(control):.2f}x to {max(control):.2f}x) show how much two timings of the same thing differ in this run."]
    rows += ["", "Folder pipeline, images/s: `predict_many` (decode threads ahead of the models) vs the plain loop the other runtimes use "
             "(decode a batch, then run it):", "",
             "| configuration | batch 8, default decode threads | batch 8, 1 decode thread | batch 1, 1 decode thread | plain loop, batch 8 |",
             "| --- | --- | --- | --- | --- |"]
    b = r["settings"]["batch"]
    for key, res in r["runtimes"].items():
        v = res.get("throughput_variants") if isinstance(res, dict) else None
        if v:
            rows.append(f"| {_label(key)} | {_f(_get(v, f'batch{b}_workersdefault', 'images_per_s'))} | "
                        f"{_f(_get(v, f'batch{b}_workers1', 'images_per_s'))} | {_f(_get(v, 'batch1_workers1', 'images_per_s'))} | "
                        f"{_f(_get(res, 'throughput_plain_loop', 'images_per_s'))} |")
    return "\n".join(rows)


def _agreement(r: dict) -> str:
    base = _get(r, "runtimes", "keras", "probabilities")
    if not base:
        return ""
    rows = ["## Same models? Ensemble probability vs Keras `model(x)` on the same images", "",
            "| runtime | largest absolute difference |", "| --- | --- |"]
    for key, res in r["runtimes"].items():
        probs = res.get("probabilities") if isinstance(res, dict) else None
        if probs and key != "keras":
            rows.append(f"| {_label(key)} | {max(abs(a - b) for a, b in zip(probs, base)):.4f} |")
    rows.append("")
    stand_ins = [n for n, c in r["keras_runs"].items() if not c["keras"]]
    mismatched = [n for n, c in r["keras_runs"].items() if c["keras"] and not (c.get("same_input") and c.get("same_arch"))]
    if stand_ins or mismatched:
        rows.append(f"**Keras here is not the bundle's training run** (untrained stand-ins: {stand_ins or 'none'}; runs whose input differs from "
                    f"the bundle's: {mismatched or 'none'}), so Keras/TFLite and pneumoedge ran different weights: differences in this table "
                    "say nothing about export fidelity (the export's own parity check does). Latency is unaffected for fp32.")
    else:
        rows.append("fp32 rows near 0 say the ONNX members are the Keras models; the founding row differs by its own preprocessing (PIL full-resolution decode and resize, where the bundle's spec may ask for a reduced decode and area resize); int8 rows show quantization's effect.")
    return "\n".join(rows)
