"""Rebuild models/default: the bundled two-member demonstration ensemble (fp32 + int8).

    python scripts/build_default_bundle.py [--out models/default] [--work /tmp/pneumoedge-default] [--epochs 8]

Generates synthetic phantoms, trains two founding architectures (cnn3_gray150, cnn4_gray256;
binary NORMAL/PNEUMONIA), exports both with parity checks, quantizes both to int8 with the
accuracy check and recipe search, chooses the ensemble's threshold on validation data (target
sensitivity 0.95), and writes the bundle. int8 is the default precision only when it meets
the tolerance. A few minutes on 2 CPU cores; needs the [export] extra.

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

ARCHS = ("cnn3_gray150", "cnn4_gray256")
COUNTS = {
    "train": {"normal": 300, "bacteria": 150, "virus": 150},
    "test": {"normal": 60, "bacteria": 30, "virus": 30},
}
SEED = 20240


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoedge-default-build"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--note", default=None, help="A line to record in the bundle's provenance (how this build differed).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from pneumoedge.datasets import phantoms
    from pneumoedge.export.evaluation import evaluate_model
    from pneumoedge.export.pipeline import SYNTHETIC_NOTICE, export_runs
    from pneumoedge.export.training import train

    started = time.perf_counter()
    if args.work.exists():
        shutil.rmtree(args.work)
    data = phantoms.generate_dataset(
        args.work / "data", counts=COUNTS, size=((320, 448), (320, 448)), seed=args.seed, sixteen_bit_fraction=0.1
    )
    print(f"phantoms: {data} ({time.perf_counter() - started:.0f} s)")
    runs = []
    for arch in ARCHS:
        t = time.perf_counter()
        result = train(
            data, arch, args.work / "runs" / arch, epochs=args.epochs, batch_size=16, seed=args.seed, patience=3,
            on_epoch=lambda e, n, logs: print(f"  {arch} epoch {e}/{n}: val_loss {logs.get('val_loss', 0):.3f} val_acc {logs.get('val_accuracy', 0):.3f}"),
        )
        runs.append(result.run_dir)
        test = result.metrics.get("test", {})
        print(f"trained {arch} in {time.perf_counter() - t:.0f} s: test accuracy {test.get('accuracy')}, AUC {test.get('roc_auc')}")

    staging = args.work / "bundle"
    bundle = export_runs(
        runs, staging, int8=True, on_fail="warn", name="pneumoedge-default-demo", progress=print,
        provenance={
            "notice": SYNTHETIC_NOTICE,
            "intended_use": "demonstration and smoke tests of the pneumoedge pipeline only",
            "rebuild": "python scripts/build_default_bundle.py",
            "data_generator": f"pneumoedge.datasets.phantoms.generate_dataset(seed={args.seed}, counts={COUNTS})",
            **({"build_note": args.note} if args.note else {}),
        },
    )
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
    if args.out.exists():
        shutil.rmtree(args.out)
    write_bundle(
        args.out,
        [MemberSource(m.path, m.name, m.card.spec, m.precision, m.weight, m.card.activation) for m in manifest.members],
        labels=manifest.labels, task=manifest.task, threshold=manifest.threshold, threshold_method=manifest.threshold_method,
        provenance=provenance, name=manifest.name, default_precision=manifest.default_precision,
    )
    (args.out / "manifest.json").chmod(0o644)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(json.dumps({"bundle": str(args.out), "bytes": total, "default_precision": manifest.default_precision, "threshold": manifest.threshold, "test": test_metrics}, indent=2))
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
