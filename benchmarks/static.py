"""Figures that need no timing: model FLOPs from the ONNX graph, installed sizes, model identity."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

#: The clinic install (pyproject's runtime dependencies) and what the research side adds.
RUNTIME_ROOTS = ("onnxruntime", "numpy", "opencv-python-headless", "typer", "rich")
TENSORFLOW_ROOTS = ("tensorflow",)


def onnx_macs(path: Path) -> dict[str, Any]:
    """Multiply-accumulates of one image (batch 1) through Conv, MatMul and Gemm nodes, from shapes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1  # a dynamic batch axis becomes 1 so every shape is known
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(numpy_helper.to_array(init).shape)
    per_op: dict[str, int] = {}
    unknown = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        out = shapes.get(node.output[0])
        weight = shapes.get(node.input[1])
        if not out or not weight or 0 in out:
            unknown += 1
            continue
        if node.op_type == "Conv":
            macs = int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            macs = int(np.prod(out)) * int(weight[1] if trans_b else weight[0])
        else:
            macs = int(np.prod(out)) * int(weight[-2])
        per_op[node.op_type] = per_op.get(node.op_type, 0) + macs
    total = sum(per_op.values())
    return {"macs": total, "flops": 2 * total, "per_op_macs": per_op, "nodes_without_shapes": unknown}


def optimized_ops(path: Path) -> dict[str, int]:
    """Node counts of the graph onnxruntime actually runs (CPU, ORT_ENABLE_ALL): what fused and what did not."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(options.optimized_model_filepath).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _requirement_names(dist: md.Distribution) -> list[str]:
    """Names of a distribution's unconditional requirements (markers evaluated, extras off)."""
    names = []
    for text in dist.requires or []:
        try:
            from packaging.requirements import Requirement

            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                names.append(req.name)
        except Exception:  # no `packaging`: keep requirements without any marker
            if ";" not in text:
                names.append(re.split(r"[ <>=!~\[;(]", text, maxsplit=1)[0])
    return names


def _closure(roots: Iterable[str]) -> dict[str, md.Distribution]:
    found: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name] = dist
        todo.extend(_requirement_names(dist))
    return found


def _dist_bytes(dist: md.Distribution, seen: set) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(file.locate()).resolve()
        if path in seen:
            continue
        seen.add(path)
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def _tree_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def installed_sizes() -> dict[str, Any]:
    """Installed size (MB, files listed in each distribution's RECORD) of the runtime vs + TensorFlow."""
    pneumoedge_bytes = _tree_bytes(ROOT / "pneumoedge", ROOT / "models")  # what the wheel ships
    result: dict[str, Any] = {"pneumoedge_mb": pneumoedge_bytes / 1e6}
    for label, roots in (("runtime", RUNTIME_ROOTS), ("with_tensorflow", RUNTIME_ROOTS + TENSORFLOW_ROOTS)):
        dists = _closure(roots)
        seen: set = set()
        sizes = {name: _dist_bytes(d, seen) / 1e6 for name, d in sorted(dists.items())}
        result[label] = {
            "total_mb": sum(sizes.values()) + pneumoedge_bytes / 1e6,
            "distributions": len(sizes) + 1,
            "largest": dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:6]),
        }
    return result


def keras_run_check(runs_dir: Path, manifest: dict, names: list[str]) -> dict[str, Any]:
    """Which Keras runs exist for the bundle's members, and whether arch and input size match."""
    members = {m["name"]: m for m in manifest["members"]}
    checks = {}
    for name in names:
        run = runs_dir / name
        entry: dict[str, Any] = {"run_dir": str(run), "keras": None}
        if (run / "model.keras").is_file():
            entry["keras"] = str(run / "model.keras")
            record = _read_json(run / "run.json") or {}
            spec = _read_json(run / "spec.json") or {}
            member = members[name]["spec"]
            entry["arch"] = record.get("arch") or record.get("architecture")
            defaults = {"decode_reduction": 1}
            entry["differs"] = {k: [spec.get(k, defaults.get(k)), member.get(k, defaults.get(k))] for k in ("height", "width", "color", "resize", "decode_reduction")
                                if spec.get(k, defaults.get(k)) != member.get(k, defaults.get(k))}
            entry["same_input"] = not entry["differs"]
            entry["same_arch"] = entry["arch"] in (None, name)
        checks[name] = entry
    return checks


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
