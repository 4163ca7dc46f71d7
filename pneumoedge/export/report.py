"""What an export reports: member and bundle results, the bundle's provenance record, report JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from pneumoedge.bundle import Manifest
from pneumoedge.export.onnx_export import ExportResult
from pneumoedge.export.quantization import QuantizationResult
from pneumoedge.export.training import Run

SYNTHETIC_NOTICE = "synthetic phantoms; demonstration only; NOT clinically validated; not for diagnosis"
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class MemberReport:
    name: str
    export: ExportResult
    weight: float
    int8: Optional[QuantizationResult] = None

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "weight": self.weight, "export": self.export.to_dict()}
        if self.int8 is not None:
            data["int8"] = self.int8.to_dict()
        return data


@dataclass
class BundleResult:
    bundle_dir: Path
    manifest: Manifest
    members: list[MemberReport]
    threshold: Optional[dict[str, Any]]
    metrics: dict[str, Any]
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle_dir),
            "default_precision": self.manifest.default_precision,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "members": [m.to_dict() for m in self.members],
            "seconds": round(self.seconds, 1),
            "steps": {k: round(v, 2) for k, v in self.steps.items()},
        }


def _provenance(runs: Sequence[Run], members: Sequence[MemberReport], metrics: dict[str, Any], threshold: Optional[dict[str, Any]], extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    data_records = [run.record.get("provenance", {}) for run in runs]
    synthetic = any(r.get("synthetic") for r in data_records)
    record: dict[str, Any] = {
        "created_by": "pneumoedge export",
        "synthetic": synthetic,
        "notice": SYNTHETIC_NOTICE if synthetic else "trained by the user; validate clinically before any use",
        "data": sorted({r.get("data", "?") for r in data_records}),
        "threshold": threshold,
        "metrics": _slim(metrics),
        "members": {},
    }
    for run, member in zip(runs, members):
        entry = {
            "arch": run.record.get("arch"),
            "parameters": run.record.get("parameters"),
            "training": run.record.get("options"),
            "epochs_run": run.record.get("epochs_run"),
            "run_metrics": _slim({k: v for k, v in run.metrics.items() if k in ("validation", "test")}),
            "parity_max_abs_diff": member.export.parity.max_abs_diff,
            "parity_images": member.export.parity.source,
            "fp32_bytes": member.export.size_bytes,
        }
        if member.int8 is not None and member.int8.chosen is not None:
            c = member.int8.chosen
            entry["int8"] = {
                "recipe": c.recipe.to_dict(),
                "max_prob_diff": c.max_prob_diff,
                "agreement": c.agreement,
                "meets_tolerance": member.int8.ok,
                "bytes": c.size_bytes,
                "latency_ms": {"fp32": member.int8.fp32_latency_ms, "int8": c.latency_ms},
                "recipes_tried": [t.recipe.name for t in member.int8.tried],
            }
        record["members"][member.name] = entry
    record.update(extra or {})
    return record


def _slim(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the bulky parts, for the manifest."""
    keep = ("images", "accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "macro_f1", "confusion_matrix", "max_prob_diff", "agreement")
    return {k: ({kk: vv for kk, vv in v.items() if kk in keep} if isinstance(v, dict) else v) for k, v in metrics.items()}


def write_report_json(path: Union[str, Path], data: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path
