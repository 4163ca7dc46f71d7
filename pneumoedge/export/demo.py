"""The end-to-end demo on generated phantoms: data, training, evaluation, export, bundle, inference."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import pneumoedge
from pneumoedge.datasets import phantoms
from pneumoedge.export.bundle_builder import BundleOptions, BundleResult, Int8Options
from pneumoedge.export.errors import ExportError
from pneumoedge.export.evaluation import evaluate_model, evaluate_run
from pneumoedge.export.pipeline import export_runs
from pneumoedge.export.report import SYNTHETIC_NOTICE, Progress, quiet, write_report_json
from pneumoedge.export.training import TrainingOptions, train


DEMO_ARCHS = ("cnn3_gray150", "cnn4_gray256")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run: `quick` is for tests and CI (tiny images, 2 epochs)."""

    counts: dict[str, dict[str, int]]
    image_size: Any
    input_size: Optional[tuple[int, int]]
    epochs: int
    patience: int
    batch_size: int
    examples: int
    #: The full demo trains as the default bundle does: X-ray-sized phantoms decoded at 1/4.
    decode_reduction: int = 1
    lr_schedule: str = "plateau"

    @classmethod
    def make(cls, quick: bool) -> "DemoPlan":
        if quick:
            return cls({"train": {"normal": 24, "bacteria": 12, "virus": 12}, "test": {"normal": 8, "bacteria": 4, "virus": 4}},
                       (96, 96), (64, 64), 2, 2, 16, 4)
        return cls({"train": {"normal": 240, "bacteria": 120, "virus": 120}, "test": {"normal": 60, "bacteria": 30, "virus": 30}},
                   ((1024, 1600), (1024, 1600)), None, 10, 10, 16, 8, decode_reduction=4, lr_schedule="cosine")

    def training(self, seed: int) -> TrainingOptions:
        return TrainingOptions(epochs=self.epochs, batch_size=self.batch_size, seed=seed, size=self.input_size,
                               patience=self.patience, decode_reduction=self.decode_reduction, lr_schedule=self.lr_schedule)


@dataclass
class DemoResult:
    out_dir: Path
    steps: dict[str, float]
    artefacts: dict[str, str]
    bundle: BundleResult
    evaluations: dict[str, dict[str, Any]]
    predictions: list[dict[str, Any]]


class _Steps:
    """Numbered steps with their durations, said as they start and end."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self.progress(f"[{len(self.seconds) + 1}] {name}")
        yield
        self.seconds[name] = time.perf_counter() - started
        self.progress(f"    done in {self.seconds[name]:.1f} s")


def run_demo(
    out_dir: Union[str, Path],
    *,
    quick: bool = False,
    archs: Sequence[str] = DEMO_ARCHS,
    seed: int = 0,
    progress: Progress = quiet,
) -> DemoResult:
    """Generate phantoms, train two architectures, evaluate, export with parity, int8, bundle, infer.

    Everything is written under `out_dir` (data/, runs/, evaluation/, bundle/, examples/,
    demo_report.json). The models are trained on synthetic phantoms: demonstration only.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; the demo writes into a new or empty folder")
    plan = DemoPlan.make(quick)
    steps = _Steps(progress)
    artefacts: dict[str, str] = {}
    evaluations: dict[str, dict[str, Any]] = {}
    with steps.step("generate synthetic phantoms (Kaggle layout)"):
        data = phantoms.generate_dataset(out / "data", counts=plan.counts, size=plan.image_size, seed=seed, sixteen_bit_fraction=0.1)
        artefacts["data"] = str(data)
    run_dirs = [_train(data, arch, out, plan, seed, steps, artefacts) for arch in archs]
    with steps.step("evaluate the Keras runs on the test split"):
        for run_dir in run_dirs:
            metrics = evaluate_run(run_dir, data / "test", out / "evaluation" / f"keras_{run_dir.name}")
            evaluations[f"keras {run_dir.name}"] = _said(run_dir.name, metrics, progress)
        artefacts["evaluation"] = str(out / "evaluation")
    with steps.step("export to ONNX with parity, int8 with accuracy check, bundle"):
        bundle = export_runs(run_dirs, out / "bundle", BundleOptions(int8=Int8Options(enabled=True), name="demo"), progress=progress)
        artefacts["bundle"] = str(bundle.bundle_dir)
    with steps.step("evaluate the bundle with the runtime (fp32, and int8 when it met its tolerance)"):
        for precision in sorted({m.precision for m in bundle.manifest.members}):
            metrics = evaluate_model(bundle.bundle_dir, data / "test", out / "evaluation" / f"bundle_{precision}", precision=precision)
            evaluations[f"bundle {precision}"] = _said(f"bundle {precision}", metrics, progress)
    with steps.step("run the runtime on example images"):
        predictions = _predict_examples(bundle.bundle_dir, out / "examples", plan, quick, seed, progress)
        artefacts["examples"] = str(out / "examples")
    report = {
        "notice": SYNTHETIC_NOTICE,
        "quick": quick,
        "steps_seconds": {k: round(v, 2) for k, v in steps.seconds.items()},
        "artefacts": artefacts,
        "evaluations": {k: {kk: v.get(kk) for kk in ("accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "images")} for k, v in evaluations.items()},
        "bundle": bundle.report(),
        "predictions": predictions,
    }
    artefacts["report"] = str(write_report_json(out / "demo_report.json", report))
    return DemoResult(out, steps.seconds, artefacts, bundle, evaluations, predictions)


def _train(data: Path, arch: str, out: Path, plan: DemoPlan, seed: int, steps: _Steps, artefacts: dict[str, str]) -> Path:
    with steps.step(f"train {arch}"):
        result = train(
            data, arch, out / "runs" / arch, plan.training(seed),
            on_epoch=lambda e, n, logs: steps.progress(f"    epoch {e}/{n}: loss {logs.get('loss', 0):.3f}, val_loss {logs.get('val_loss', 0):.3f}, val_acc {logs.get('val_accuracy', 0):.3f}"),
        )
        artefacts[f"run {arch}"] = str(result.run_dir)
    return result.run_dir


def _said(name: str, metrics: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress(f"    {name}: accuracy {metrics['accuracy']:.3f}, ROC AUC {metrics['roc_auc'] or float('nan'):.3f}")
    return metrics


def _predict_examples(bundle: Path, folder: Path, plan: DemoPlan, quick: bool, seed: int, progress: Progress) -> list[dict[str, Any]]:
    """Example phantoms run through the runtime, as `infer` would."""
    if quick:
        examples = phantoms.write_examples(folder, n=plan.examples, seed=seed + 7, size=plan.image_size, png_size=None)
    else:
        examples = phantoms.write_examples(folder, n=plan.examples, seed=seed + 7)
    predictions = [p.to_dict() for p in pneumoedge.load(bundle).predict_many(examples)]
    for p in predictions:
        progress(f"    {Path(p['path']).name}: {p['label']} (p={p['probability']:.3f})")
    return predictions
