"""Rebuild models/default: the bundled two-member demonstration ensemble (fp32 + int8).

    python scripts/build_default_bundle.py [--out models/default] [--work /tmp/pneumoedge-default-build]

Generates synthetic phantoms at the size of real chest X-rays (1024-1600 px a side, 1-2.6 Mpx;
JPEG, a tenth 16-bit PNG), trains two founding architectures (cnn3_gray150, cnn4_gray256;
binary NORMAL/PNEUMONIA) with JPEG decode at 1/4 (`decode_reduction=4`, recorded in the spec,
so the runtime decodes the same cheap way; 1/4 of 1024-1600 px is 256-400 px, still at least
both inputs, so the area resize only ever shrinks) and a cosine learning-rate schedule, exports
both with parity checks, quantizes both to int8 with the accuracy check and recipe search,
chooses the ensemble's threshold on validation data (target sensitivity 0.95), evaluates fp32
and int8 on the test split with the runtime, and writes the bundle. int8 is the default
precision only when every member meets the tolerance. About 20-25 minutes on 2 CPU cores;
needs the [export] extra. The Keras models stay in WORK/runs/<arch>/model.keras.

The models are trained on SYNTHETIC PHANTOMS: demonstration only, NOT clinically validated,
not for diagnosis. The provenance in manifest.json says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Architecture -> epochs (cosine schedule over them). cnn4_gray256 costs ~8x cnn3_gray150 per
#: image, so it gets fewer epochs to keep the build within ~25 minutes on 2 cores.
ARCHS = {"cnn3_gray150": 16, "cnn4_gray256": 8}
COUNTS = {
    "train": {"normal": 500, "bacteria": 250, "virus": 250},
    "test": {"normal": 100, "bacteria": 50, "virus": 50},
}
#: Real chest X-rays are 1-2.5 Mpx: decode cost is part of the clinic's latency.
IMAGE_SIZE = ((1024, 1600), (1024, 1600))
DECODE_REDUCTION = 4
DEFAULT_PRECISION_REASON = (
    "fp32 runs by default: on a 2-core AVX2 CPU without VNNI, the int8 members were slower than fp32 "
    "model-only and end to end at no accuracy gain (benchmarks/RESULTS.md); use --precision int8 where "
    "int8 kernels are faster (CPUs with VNNI), after measuring with pneumoedge bench"
)
SEED = 20240


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoedge-default-build"))
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="Multiply every architecture's epochs (e.g. 0.5 for a quicker, weaker build).")
    parser.add_argument("--reuse-runs", action="store_true", help="Keep WORK's phantoms and finished runs (train only the missing ones), then export, quantize, evaluate and write the bundle again.")
    parser.add_argument("--decode-reduction", type=int, default=DECODE_REDUCTION, choices=(1, 2, 4, 8))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--default-precision", choices=("fp32", "int8", "auto"), default="fp32",
        help="Which members run by default. fp32: on the AVX2 CPU without VNNI measured in benchmarks/RESULTS.md, "
        "int8 was slower than fp32 for these small CNNs, at no accuracy gain. auto: int8 when it met the tolerance.",
    )
    parser.add_argument("--note", default=None, help="A line to record in the bundle's provenance (how this build differed).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from pneumoedge.export.evaluation import evaluate_model
    from pneumoedge.export.bundle_builder import BundleOptions, Int8Options
    from pneumoedge.export.pipeline import export_runs
    from pneumoedge.export.report import SYNTHETIC_NOTICE

    started = time.perf_counter()
    data = args.work / "data"
    if args.reuse_runs:
        shutil.rmtree(args.work / "bundle", ignore_errors=True)
        shutil.rmtree(args.work / "evaluation", ignore_errors=True)
    runs, trained, decode_ms = _generate_and_train(args, data, started)
    staging = args.work / "bundle"
    options = BundleOptions(
        int8=Int8Options(enabled=True), name="pneumoedge-default-demo",
        provenance={
            "notice": SYNTHETIC_NOTICE,
            "intended_use": "demonstration and smoke tests of the pneumoedge pipeline only",
            "rebuild": "python scripts/build_default_bundle.py",
            "build_command": " ".join(["python scripts/build_default_bundle.py", *(argv if argv is not None else sys.argv[1:])]),
            "data_generator": f"pneumoedge.datasets.phantoms.generate_dataset(seed={args.seed}, counts={COUNTS}, size={IMAGE_SIZE}, sixteen_bit_fraction=0.1)",
            "decode_reduction": args.decode_reduction,
            "jpeg_preprocess_ms_per_image": decode_ms,
            "keras_runs": trained,
            **({"build_note": args.note} if args.note else {}),
        },
    )
    bundle = export_runs(runs, staging, options, progress=print)
    test_metrics = {}
    for precision in ("fp32", "int8"):
        m = evaluate_model(staging, data / "test", args.work / "evaluation" / precision, precision=precision)
        test_metrics[precision] = {k: m[k] for k in ("images", "accuracy", "roc_auc", "sensitivity", "specificity", "threshold")}
        print(f"bundle {precision} on the synthetic test split: {test_metrics[precision]}")

    # The bundle's manifest gets the test figures too, then is rewritten with the same members.
    from pneumoedge.bundle import MemberSource, write_bundle

    manifest = bundle.manifest
    provenance = dict(manifest.provenance)
    provenance["metrics"] = {**provenance.get("metrics", {}), "test_synthetic": test_metrics}
    provenance["build_seconds"] = round(time.perf_counter() - started)
    default_precision = manifest.default_precision if args.default_precision == "auto" else args.default_precision
    provenance["default_precision_reason"] = DEFAULT_PRECISION_REASON if args.default_precision == "fp32" else f"--default-precision {args.default_precision}"
    if args.out.exists():
        shutil.rmtree(args.out)
    write_bundle(
        args.out,
        [MemberSource(m.path, m.name, m.card.spec, m.precision, m.weight, m.card.activation, m.card.explain,
                      ood_file=m.ood["path"] if m.ood else None, ood=m.ood) for m in manifest.members],
        labels=manifest.labels, task=manifest.task, threshold=manifest.threshold, threshold_method=manifest.threshold_method,
        provenance=provenance, name=manifest.name, default_precision=default_precision,
    )
    (args.out / "manifest.json").chmod(0o644)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(json.dumps({"bundle": str(args.out), "bytes": total, "default_precision": default_precision, "threshold": manifest.threshold, "test": test_metrics}, indent=2))
    print(f"done in {time.perf_counter() - started:.0f} s; Keras models: " + ", ".join(str(r / "model.keras") for r in runs))
    return 0


def _generate_and_train(args: argparse.Namespace, data: Path, started: float) -> tuple[list[Path], dict, dict[str, dict[str, float]]]:
    """Phantoms into WORK/data, then one run per architecture in WORK/runs/<arch>/."""
    from pneumoedge.datasets import phantoms
    from pneumoedge.export.training import TrainingOptions, train

    if not (args.reuse_runs and phantoms.is_synthetic(data)):
        if args.work.exists():
            shutil.rmtree(args.work)
        data = phantoms.generate_dataset(data, counts=COUNTS, size=IMAGE_SIZE, seed=args.seed, sixteen_bit_fraction=0.1)
    print(f"phantoms: {data} ({time.perf_counter() - started:.0f} s)", flush=True)
    decode_ms = decode_costs(data / "test")
    print("JPEG ms per image (median; decode, then decode + 150 and 256 px tensors): "
          + ", ".join(f"{k}: {v['decode_ms']:.1f} / {v['decode_and_tensors_ms']:.1f}" for k, v in decode_ms.items()), flush=True)
    runs, trained = [], {}
    for arch, epochs in ARCHS.items():
        run_dir = args.work / "runs" / arch
        if args.reuse_runs and (run_dir / "run.json").is_file():
            runs.append(run_dir)
            trained[arch] = _run_summary(run_dir)
            print(f"reusing {run_dir}: {trained[arch]}", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run from an interrupted build
        epochs = max(1, round(epochs * args.epochs_scale))
        result = train(
            data, arch, run_dir,
            TrainingOptions(epochs=epochs, batch_size=16, seed=args.seed, patience=epochs, decode_reduction=args.decode_reduction, lr_schedule="cosine"),
            on_epoch=lambda e, n, logs: print(f"  {arch} epoch {e}/{n}: loss {logs.get('loss', 0):.3f} val_loss {logs.get('val_loss', 0):.3f} val_acc {logs.get('val_accuracy', 0):.3f} val_auc {logs.get('val_auc', 0):.3f}", flush=True),
        )
        runs.append(result.run_dir)
        test = result.metrics.get("test", {})
        trained[arch] = {"epochs": epochs, "best_epoch": result.best_epoch, "seconds": round(result.seconds), "decode_reduction": result.spec.decode_reduction,
                         "test": {k: test.get(k) for k in ("accuracy", "roc_auc", "sensitivity", "specificity")}}
        print(f"trained {arch} (decode 1/{result.spec.decode_reduction}) in {result.seconds:.0f} s: {trained[arch]['test']}", flush=True)

    return runs, trained, decode_ms


def _run_summary(run_dir: Path) -> dict:
    """What `_generate_and_train` prints for a run, read back from its folder."""
    record = json.loads((run_dir / "run.json").read_text())
    test = json.loads((run_dir / "metrics.json").read_text()).get("test", {})
    spec = json.loads((run_dir / "spec.json").read_text())
    return {"epochs": record["options"]["epochs"], "best_epoch": record["best_epoch"], "seconds": record["seconds"],
            "decode_reduction": spec.get("decode_reduction", 1), "test": {k: test.get(k) for k in ("accuracy", "roc_auc", "sensitivity", "specificity")}}


def decode_costs(folder: Path, limit: int = 30, repeats: int = 5) -> dict[str, dict[str, float]]:
    """ms per JPEG of `folder`: decode, and decode + both members' tensors, at 1, 1/2, 1/4 scale.

    The second figure is what the runtime pays per image before the models run: at full scale
    the float conversion and area resize of 1-2.6 Mpx cost more than the decode itself. Each
    file's figure is its fastest of `repeats` runs (a busy neighbour only ever adds time), and
    the median over files is reported.
    """
    import statistics

    from pneumoedge.preprocessing import PreprocessSpec, read_for, to_tensor

    blobs = [f.read_bytes() for f in sorted(folder.rglob("*.jpeg"))[:limit]]
    costs = {}
    for reduction in (1, 2, 4):
        specs = [PreprocessSpec(height=n, width=n, decode_reduction=reduction) for n in (150, 256)]
        decode, total = [], []
        for data in blobs:
            best_decode = best_total = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                pixels = read_for(data, specs[0])
                t1 = time.perf_counter()
                for spec in specs:
                    to_tensor(pixels, spec)
                best_decode, best_total = min(best_decode, t1 - t), min(best_total, time.perf_counter() - t)
            decode.append(best_decode * 1000)
            total.append(best_total * 1000)
        costs[f"1/{reduction}"] = {"decode_ms": round(statistics.median(decode), 2), "decode_and_tensors_ms": round(statistics.median(total), 2)}
    return costs


if __name__ == "__main__":
    sys.exit(main())
