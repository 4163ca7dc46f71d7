"""One measurement per fresh process: `python -m benchmarks.workers TASK CONFIG.json OUT.json`.

Every runtime is measured with the same protocol on the same image files (`measure`):
model-only latency per model (batch 1 and batched), both models (batch 1), end to end per
image (read + decode + preprocess + both models + average) and folder throughput, plus the
ensemble probability of each image (to check that the runtimes run the same models) and the
process's peak resident memory. Only the Keras/TFLite-conversion tasks import TensorFlow.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pneumoedge.benchmarking.measure import peak_rss_mb, rss_mb, summarize, time_calls  # noqa: E402

Prepare = Callable[[str], list]  # path -> one (H, W, C) float32 tensor per model
Run = Callable[[int, np.ndarray], np.ndarray]  # (model index, batch) -> (N,) probabilities


def _cycle(items: Sequence[Any], n: int) -> list:
    return list(itertools.islice(itertools.cycle(items), n))


def measure(cfg: dict, names: Sequence[str], prepare: Prepare, run: Run, *, batch_throughput: bool = True) -> dict[str, Any]:
    """The shared protocol. `batch_throughput=False` times the folder one image at a time."""
    images, runs, warmup, batch = cfg["images"], cfg["runs"], cfg["warmup"], cfg["batch"]
    n = len(images)
    tensors = [prepare(p) for p in images]
    out: dict[str, Any] = {"models": {}}
    for k, name in enumerate(names):
        singles = [t[k][None] for t in tensors]
        stacked = np.ascontiguousarray(np.stack(_cycle([t[k] for t in tensors], batch)))
        first = time.perf_counter()
        run(k, singles[0])
        first = time.perf_counter() - first
        out["models"][name] = {
            "first_ms": first * 1000.0,
            "b1_ms": summarize(time_calls(lambda i: run(k, singles[i % n]), runs, warmup)),
            "batch_ms": summarize(time_calls(lambda i: run(k, stacked), max(3, runs // batch), 1)),
        }
    both = lambda i: [run(k, tensors[i % n][k][None]) for k in range(len(names))]  # noqa: E731
    out["ensemble_b1_ms"] = summarize(time_calls(both, runs, warmup))
    out["prepare_ms"] = summarize(time_calls(lambda i: prepare(images[i % n]), runs, 1))

    def end_to_end(i: int) -> float:
        per_model = prepare(images[i % n])
        return float(np.mean([run(k, per_model[k][None])[0] for k in range(len(names))]))

    out["end_to_end_ms"] = summarize(time_calls(end_to_end, runs, warmup))
    out["probabilities"] = [end_to_end(i) for i in range(n)]
    out["throughput"] = _throughput(cfg, len(names), prepare, run, batch if batch_throughput else 1)
    return out


def _throughput(cfg: dict, models: int, prepare: Prepare, run: Run, batch: int) -> dict[str, Any]:
    stream = _cycle(cfg["images"], cfg["throughput_images"])
    start = time.perf_counter()
    for offset in range(0, len(stream), batch):
        prepared = [prepare(p) for p in stream[offset : offset + batch]]
        np.mean([run(k, np.stack([t[k] for t in prepared])) for k in range(models)], axis=0)  # the ensemble's average
    seconds = time.perf_counter() - start
    return {"images": len(stream), "batch": batch, "seconds": seconds, "images_per_s": len(stream) / seconds}


def _specs(cfg: dict) -> list:
    from pneumoedge.bundle import read_manifest

    members = {m.name: m.card.spec for m in read_manifest(cfg["bundle"]).members}
    return [members[m["name"]] for m in cfg["models"]]


def _pneumoedge_prepare(specs: list) -> Prepare:
    """pneumoedge's preprocessing (decode once per decode mode, a tensor per model)."""
    from pneumoedge.preprocessing import read_for, to_tensor

    def prepare(path: str) -> list:
        decoded: dict = {}
        tensors = []
        for spec in specs:
            if spec.decode_key not in decoded:
                decoded[spec.decode_key] = read_for(path, spec)
            tensors.append(to_tensor(decoded[spec.decode_key], spec))
        return tensors

    return prepare


def _keras_models(cfg: dict) -> list:
    import keras

    from pneumoedge.export.architectures import get_architecture

    models = []
    for m in cfg["models"]:
        if m.get("keras"):
            models.append(keras.saving.load_model(m["keras"], compile=False))
        else:  # untrained stand-in of the same architecture: fp32 latency does not depend on weight values
            models.append(get_architecture(m["name"]).build())
    return models


def task_founding(cfg: dict) -> dict[str, Any]:
    """The founding projects' way: per image PIL open -> resize -> /255 -> model.predict per model, averaged."""
    from PIL import Image

    specs, models = _specs(cfg), _keras_models(cfg)

    def prepare(path: str) -> list:
        with Image.open(path) as img:
            gray = img.convert("L")
        return [np.asarray(gray.resize((s.width, s.height)), dtype=np.float32)[:, :, None] / 255.0 for s in specs]

    def run(k: int, x: np.ndarray) -> np.ndarray:
        return models[k].predict(x, verbose=0).reshape(-1)

    return measure(cfg, [m["name"] for m in cfg["models"]], prepare, run, batch_throughput=False)


def task_keras(cfg: dict) -> dict[str, Any]:
    """Keras `model(x, training=False)` on pneumoedge's tensors, batch 1 and batched."""
    specs, models = _specs(cfg), _keras_models(cfg)
    result = measure(
        cfg, [m["name"] for m in cfg["models"]], _pneumoedge_prepare(specs),
        lambda k, x: np.asarray(models[k](x, training=False)).reshape(-1),
    )
    result["params"] = {m["name"]: int(model.count_params()) for m, model in zip(cfg["models"], models)}
    result["input_shapes"] = {m["name"]: list(model.input_shape[1:]) for m, model in zip(cfg["models"], models)}
    return result


def task_tflite_convert(cfg: dict) -> dict[str, Any]:
    """Convert each Keras model to TFLite fp32 and full-integer int8 (int8 input/output).

    int8 calibration: the benchmark's images through pneumoedge's preprocessing.
    """
    import tensorflow as tf

    specs, models = _specs(cfg), _keras_models(cfg)
    prepare = _pneumoedge_prepare(specs)
    calibration = [prepare(p) for p in cfg["calibration_images"]]
    folder = Path(cfg["tflite_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    report = {}
    for k, (m, model) in enumerate(zip(cfg["models"], models)):
        saved = folder / f"{m['name']}_saved_model"
        start = time.perf_counter()
        model.export(str(saved), format="tf_saved_model", verbose=False)  # Keras 3: from_keras_model fails on it
        for precision in ("fp32", "int8"):
            converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            if precision == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = lambda k=k: ([t[k][None]] for t in calibration)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            data = converter.convert()
            path = folder / f"{m['name']}.{precision}.tflite"
            path.write_bytes(data)
            report[f"{m['name']}.{precision}"] = {"path": str(path), "bytes": len(data)}
        report[m["name"] + ".convert_s"] = time.perf_counter() - start
    return {"files": report, "tensorflow": tf.__version__}


def task_tflite(cfg: dict) -> dict[str, Any]:
    """LiteRT interpreter (XNNPACK, its default CPU delegate), `num_threads` = cfg threads."""
    from ai_edge_litert.interpreter import Interpreter

    specs = _specs(cfg)
    paths = [Path(cfg["tflite_dir"]) / f"{m['name']}.{cfg['precision']}.tflite" for m in cfg["models"]]
    interpreters: dict = {}

    def interpreter(k: int, n: int):
        key = (k, n)
        if key not in interpreters:  # one per batch size: resizing on every call would reallocate
            it = Interpreter(model_path=str(paths[k]), num_threads=cfg["threads"])
            index = it.get_input_details()[0]["index"]
            it.resize_tensor_input(index, [n, *specs[k].input_shape])
            it.allocate_tensors()
            interpreters[key] = it
        return interpreters[key]

    def run(k: int, x: np.ndarray) -> np.ndarray:
        it = interpreter(k, len(x))
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        if inp["dtype"] == np.int8:  # full-integer model: quantizing the input is part of its cost
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.reshape(-1)

    result = measure(cfg, [m["name"] for m in cfg["models"]], _pneumoedge_prepare(specs), run)
    result["bytes"] = {str(p.name): p.stat().st_size for p in paths}
    return result


def task_ort(cfg: dict) -> dict[str, Any]:
    """pneumoedge: `load`, member sessions, `predict` end to end and `predict_many` throughput."""
    import onnxruntime as ort

    import pneumoedge

    ensemble = pneumoedge.load(cfg["bundle"], precision=cfg["precision"], threads=cfg["threads"])
    wanted = [m["name"] for m in cfg["models"]]
    members = [m for m in ensemble.members if m.name in wanted]
    if len(members) != len(ensemble.members):
        ensemble = pneumoedge.Ensemble(members, threshold=ensemble.threshold)

    def run(k: int, x: np.ndarray) -> np.ndarray:
        member = ensemble.members[k]
        return member.session.run(None, {member.input_name: x})[0].reshape(-1)

    def prepare(path: str) -> list:
        return ensemble.tensors(ensemble.decode(path))

    result = measure(cfg, wanted, prepare, run)
    result["throughput_plain_loop"] = result.pop("throughput")  # the loop the other runtimes use: no decode threads
    images, runs, warmup = cfg["images"], cfg["runs"], cfg["warmup"]
    n = len(images)
    # The real pipeline: predict() per image, and predict_many over a folder (threaded decode, batching).
    result["end_to_end_ms"] = summarize(time_calls(lambda i: ensemble.predict(images[i % n]), runs, warmup))
    result["probabilities"] = [ensemble.predict(p).probabilities[ensemble.labels[-1]] for p in images]
    stream = _cycle(images, cfg["throughput_images"])
    variants = {}
    for batch, workers in ((cfg["batch"], None), (cfg["batch"], 1), (1, 1)):
        start = time.perf_counter()
        ok = sum(1 for p in ensemble.predict_many(stream, batch_size=batch, workers=workers) if p.status == "ok")
        seconds = time.perf_counter() - start
        variants[f"batch{batch}_workers{workers or 'default'}"] = {"images": len(stream), "ok": ok, "seconds": seconds, "images_per_s": len(stream) / seconds}
    result["throughput"] = dict(variants[f"batch{cfg['batch']}_workers{'default'}"], batch=cfg["batch"])
    result["throughput_variants"] = variants
    # Before/after for session options: onnxruntime's defaults vs pneumoedge's create_session.
    plain = {}
    for k, member in enumerate(members):
        options = ort.SessionOptions()
        if cfg["threads"]:
            options.intra_op_num_threads = cfg["threads"]
        session = ort.InferenceSession(member.source, sess_options=options, providers=["CPUExecutionProvider"])
        x = ensemble.tensors(ensemble.decode(images[0]))[k][None]
        feed = {session.get_inputs()[0].name: x}
        plain[member.name] = summarize(time_calls(lambda i: session.run(None, feed), runs, warmup))
    result["default_session_options_b1_ms"] = plain
    result["spinning"] = _spinning_variant(cfg, members, images, stream)
    result["provider"] = ensemble.provider
    result["decode_reductions"] = sorted({m.card.spec.decode_reduction for m in members})
    return result


def _spinning_variant(cfg: dict, members: list, images: list, stream: list) -> dict[str, Any]:
    """The same ensemble with onnxruntime's threads allowed to spin (its default): model only and folder."""
    import pneumoedge
    from pneumoedge.runtime import sessions

    sessions.ALLOW_SPINNING = True
    try:
        spinning = pneumoedge.load(cfg["bundle"], precision=cfg["precision"], threads=cfg["threads"])
    finally:
        sessions.ALLOW_SPINNING = False
    chosen = [m for m in spinning.members if m.name in {x.name for x in members}]
    ensemble = pneumoedge.Ensemble(chosen, threshold=spinning.threshold)
    out: dict[str, Any] = {"b1_ms": {}}
    for member in chosen:
        feed = {member.input_name: ensemble.tensors(ensemble.decode(images[0]))[chosen.index(member)][None]}
        out["b1_ms"][member.name] = summarize(time_calls(lambda i: member.session.run(None, feed), cfg["runs"], cfg["warmup"]))
    start = time.perf_counter()
    count = sum(1 for _ in ensemble.predict_many(stream, batch_size=cfg["batch"]))
    out["images_per_s"] = count / (time.perf_counter() - start)
    return out


def task_gemm(cfg: dict) -> dict[str, Any]:
    """numpy float32 GEMM GFLOP/s (threads fixed by the parent through BLAS environment variables)."""
    size = cfg["gemm_size"]
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    times = time_calls(lambda i: np.matmul(a, b, out=c), cfg["gemm_runs"], 2)
    best = min(times)
    result = {"size": size, "runs": len(times), "best_s": best, "median_s": float(np.median(times)), "gflops": 2 * size**3 / best / 1e9}
    result["onnxruntime"] = {kind: _ort_gemm(kind, size, cfg["gemm_threads"], cfg["gemm_runs"]) for kind in ("MatMul", "MatMulInteger")}
    return result


def _ort_gemm(kind: str, size: int, threads: int, runs: int) -> dict[str, float]:
    """onnxruntime's own GEMM peak: fp32 MatMul vs u8 x s8 MatMulInteger (what int8 convolutions reduce to)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    integer = kind == "MatMulInteger"
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8) if integer else rng.standard_normal((size, size), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node(kind, ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8 if integer else TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32 if integer else TensorProto.FLOAT, [size, size])],
        initializer=[numpy_helper.from_array(weight, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (size, size), dtype=np.uint8) if integer else rng.standard_normal((size, size), dtype=np.float32)
    best = min(time_calls(lambda i: session.run(None, {"a": a}), runs, 2))
    return {"threads": threads, "best_s": best, "gops": 2 * size**3 / best / 1e9}


def task_flatness(cfg: dict) -> dict[str, Any]:
    """Resident memory sampled over one long predict_many run (files cycled)."""
    import pneumoedge

    ensemble = pneumoedge.load(cfg["bundle"], precision=cfg["precision"], threads=cfg["threads"])
    total, every = cfg["flat_images"], max(1, cfg["flat_images"] // 100)
    stream = (p for p in itertools.islice(itertools.cycle(cfg["images"]), total))
    samples, start = [], time.perf_counter()
    for i, prediction in enumerate(ensemble.predict_many(stream, batch_size=cfg["batch"]), 1):
        if prediction.status != "ok":
            raise RuntimeError(f"{prediction.source}: {prediction.error}")
        if i % every == 0 or i == total:
            samples.append((i, rss_mb()))
    seconds = time.perf_counter() - start
    rss = np.array([s[1] for s in samples])
    settled = len(samples) // 10  # the first tenth fills the session arenas and the look-ahead window
    half = len(samples) // 2
    xs = np.array([s[0] for s in samples[half:]], dtype=np.float64)
    slope = float(np.polyfit(xs, rss[half:], 1)[0] * 1000.0) if len(xs) > 1 else 0.0
    return {
        "images": total, "seconds": seconds, "images_per_s": total / seconds,
        "rss_first_mb": float(rss[0]), "rss_start_mb": float(rss[settled]), "start_after_images": samples[settled][0], "rss_end_mb": float(rss[-1]), "rss_peak_mb": float(rss.max()),
        "growth_second_half_mb_per_1000": slope, "samples": samples,
    }


def task_several(cfg: dict) -> dict[str, Any]:
    """Several tasks in one process (quick mode only: saves TensorFlow's import per task)."""
    return {task: TASKS[task](cfg) for task in cfg["tasks"]}


TASKS = {name[5:]: fn for name, fn in globals().items() if name.startswith("task_")}


def main(argv: Sequence[str]) -> int:
    task, config, out = argv
    cfg = json.loads(Path(config).read_text(encoding="utf-8"))
    result = TASKS[task](cfg)
    result["peak_rss_mb"] = peak_rss_mb()
    result["tensorflow_loaded"] = "tensorflow" in sys.modules
    Path(out).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
