"""int8 on a deep backbone: a keras.applications MobileNetV2 (depthwise separable convolutions,
batch norm; weights=None, no download) trained briefly on phantoms, exported as a foreign model
with `--int8`, and the search's trade-off curve recorded.

    python benchmarks/int8_deep.py [--work /tmp/pneumoedge-int8-deep] [--epochs 4] [--budget 300] [--record]

Synthetic phantoms only: the model is a test object for quantization, not a classifier of
patients. Prints the tried recipes, the chosen one, the curve (nodes kept in fp32 vs largest
probability difference, label agreement, latency) and the machine; `--record` writes
benchmarks/int8_deep.json and a section of benchmarks/RESULTS.md between markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results_md import write_section  # noqa: E402

SIZE = 128


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((set(l.split(":", 1)[1].split()) for l in text.splitlines() if l.startswith("flags")), set())
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} ({' '.join(simd)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoedge-int8-deep"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    import keras

    from pneumoedge.datasets import phantoms
    from pneumoedge.export.bundle_builder import BundleOptions, Int8Options
    from pneumoedge.export.foreign import export_foreign
    from pneumoedge.export.tensors import image_files, load_tensors
    from pneumoedge.export.quantization import Tolerance
    from pneumoedge.preprocessing import PreprocessSpec

    started = time.perf_counter()
    data = args.work / "data"
    if not phantoms.is_synthetic(data):
        phantoms.generate_dataset(data, counts={"train": {"normal": 200, "bacteria": 100, "virus": 100}, "test": {"normal": 40, "bacteria": 20, "virus": 20}},
                                  size=(320, 320), seed=99)
    spec = PreprocessSpec(height=SIZE, width=SIZE, color="rgb", resize="bilinear", scale=1.0 / 255.0)
    files = image_files(data / "train")
    x = load_tensors(files, spec)
    y = np.array([0.0 if "NORMAL" in f.parent.name else 1.0 for f in files], dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(y))  # the validation split takes the last rows
    x, y = x[order], y[order]
    keras.utils.set_random_seed(1)
    backbone = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.5, include_top=False, weights=None)
    for layer in backbone.layers:  # its batch norms average over ~1000 steps by default; a short run has ~200
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), backbone, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    t = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=16, validation_split=0.15, verbose=2)
    train_s = time.perf_counter() - t
    path = args.work / "mobilenetv2.keras"
    model.save(path)
    out = args.work / "bundle"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t = time.perf_counter()
    options = BundleOptions(images=data / "test", int8=Int8Options(enabled=True, calibration=data / "train", tolerance=Tolerance(),
                                                                   on_fail="warn", budget_s=args.budget))
    result = export_foreign(path, out, options, spec=spec, labels=("NORMAL", "PNEUMONIA"), head="sigmoid", progress=print)
    export_s = time.perf_counter() - t
    q = result.members[0].int8
    chosen = q.chosen
    figures = {
        "model": f"keras.applications.MobileNetV2(alpha=0.5, {SIZE}x{SIZE}x3, weights=None) + GAP + Dense(1, sigmoid), {model.count_params()} parameters",
        "trained": {"images": len(files), "epochs": args.epochs, "seconds": round(train_s), "val_accuracy": float(history.history.get("val_accuracy", [np.nan])[-1])},
        "machine": cpu_flags(),
        "tolerance": {"max_prob_diff": q.tolerance.max_prob_diff, "min_agreement": q.tolerance.min_agreement},
        "images": q.images,
        "fp32_latency_ms": round(q.fp32_latency_ms, 3),
        "chosen": None if chosen is None else {"recipe": chosen.recipe.name, "max_prob_diff": chosen.max_prob_diff, "agreement": chosen.agreement,
                                                "latency_ms": round(chosen.latency_ms, 3), "meets": chosen.meets},
        "tried": [{"recipe": c.recipe.name, "max_prob_diff": c.max_prob_diff, "agreement": c.agreement, "latency_ms": round(c.latency_ms, 3) if c.latency_ms == c.latency_ms else None, "meets": c.meets}
                  for c in q.tried if c.error is None],
        "curve": q.curve,
        "export_seconds": round(export_s),
        "seconds": round(time.perf_counter() - started),
        "notice": "synthetic phantoms; a test object for quantization, not a classifier of patients",
    }
    text = json.dumps(figures, indent=1, default=float)
    print(text)
    if args.record:
        (ROOT / "benchmarks" / "int8_deep.json").write_text(text + "\n")
        _record(figures)
    return 0


def _record(f: dict) -> None:
    rows = "\n".join(f"| {p['fp32_nodes']} | {p['max_prob_diff']:.4f} | {p['agreement']:.3f} | {p['latency_ms']:.2f} | {'yes' if p['meets'] else 'no'} |" for p in f["curve"])
    chosen = f["chosen"] or {}
    section = f"""<!-- int8_deep:start -->
## int8 on a deep backbone (`python benchmarks/int8_deep.py --record`)

{f['model']}, trained {f['trained']['epochs']} epochs on {f['trained']['images']} synthetic phantoms
(val accuracy {f['trained']['val_accuracy']:.2f}); {f['machine']}. Tolerance: max |dp| <= {f['tolerance']['max_prob_diff']},
agreement >= {f['tolerance']['min_agreement']} on {f['images']} test phantoms. fp32 {f['fp32_latency_ms']:.2f} ms (batch 1, 1 thread).
Chosen: `{chosen.get('recipe')}`: max |dp| {chosen.get('max_prob_diff', float('nan')):.4f}, agreement {chosen.get('agreement', float('nan')):.3f},
{chosen.get('latency_ms', float('nan')):.2f} ms, meets the tolerance: {chosen.get('meets')}.

Trade-off curve of the search (the most quantization-sensitive nodes kept in fp32, on the closest QDQ recipe):

| nodes in fp32 | max abs dp | agreement | latency ms | meets |
| ---: | ---: | ---: | ---: | :---: |
{rows}
<!-- int8_deep:end -->"""
    write_section("int8_deep", section)


if __name__ == "__main__":
    raise SystemExit(main())
