"""Wrap an ONNX classifier from any framework (PyTorch, a vendor) into a checked pneumoedge member.

Needs only `onnx` and onnxruntime, never TensorFlow. The graph is checked against the declared
spec (one float32 image input of the declared layout and size, one output whose width fits the
labels, an opset onnxruntime runs), the spec and card go into metadata_props, and nothing else
of the graph changes: `wrap_onnx` proves it by comparing the graphs' protobufs (without the
metadata and the optional heatmap additions) and output 0 of both files bit for bit on the
same tensors. Heatmap outputs are added when the head allows a closed form (`onnx_cam`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge import thresholds
from pneumoedge.bundle import FEATURES_OUTPUT, HEATMAP_OUTPUT, ONNX_METADATA_KEY, ORIGIN_KEY, MemberSource, ModelCard, sha256_file
from pneumoedge.export.bundle_builder import BundleOptions, BundleResult, build_bundle
from pneumoedge.export.errors import ExportError, HeatmapUnavailable
from pneumoedge.export.foreign import declared_options, foreign_member, foreign_provenance, single_file
from pneumoedge.export.heads import card_for, check_probabilities
from pneumoedge.export.onnx_cam import PREFIX, add_heatmap_outputs, default_opset
from pneumoedge.export.report import Progress, quiet
from pneumoedge.export.tensors import image_files, reference_tensors
from pneumoedge.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class WrapResult:
    """A wrapped file and the evidence that it is the original graph, unchanged."""

    onnx_path: Path
    card: ModelCard
    source: Path
    source_sha256: str
    fixed_batch: Optional[int]
    opset: int
    explain: Optional[dict[str, Any]]
    heatmap_note: str
    equality: dict[str, Any]
    sample_probabilities: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_path": str(self.onnx_path), "card": self.card.to_dict(), "source": str(self.source),
            "source_sha256": self.source_sha256, "fixed_batch": self.fixed_batch, "opset": self.opset,
            "explain": self.explain, "heatmap_note": self.heatmap_note, "equality": self.equality,
            "sample_probabilities": [{"file": f, "probabilities": p} for f, p in self.sample_probabilities],
            "seconds": round(self.seconds, 3),
        }


def load_onnx(path: Union[str, Path]) -> Any:
    """Load and check an ONNX file; one-line ExportError when it is not a valid ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ExportError(f"{path}: not an ONNX model (it cannot be parsed as ONNX protobuf: {type(exc).__name__})") from None
    if not model.ir_version or not model.graph.node:
        raise ExportError(f"{path}: not an ONNX model (no IR version or no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: the ONNX checker rejects this model: {first}") from None
    return model


def _dims(value_info: Any) -> list[Union[int, str, None]]:
    """A tensor's dims: ints where fixed, the dim_param name (or None) where not."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def check_graph(model: Any, spec: PreprocessSpec, source: str) -> tuple[str, Optional[int]]:
    """Check the graph's one image input and one output against `spec`.

    Returns (input name, fixed batch size or None when the batch axis is dynamic).
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(
            f"{source}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
            "pneumoedge wraps classifiers with exactly one image input"
        )
    node = inputs[0]
    elem = node.type.tensor_type.elem_type
    if elem != _FLOAT:
        import onnx

        raise ExportError(
            f"{source}: input {node.name!r} is {onnx.TensorProto.DataType.Name(elem)}; pneumoedge feeds float32 "
            "tensors (export the model with a float32 input)"
        )
    dims = _dims(node)
    if len(dims) != 4:
        raise ExportError(f"{source}: input {node.name!r} has rank {len(dims)} ({dims}); an image batch has rank 4 (N, C, H, W or N, H, W, C)")
    want = spec.input_shape
    clash = [(have, need) for have, need in zip(dims[1:], want) if isinstance(have, int) and have != need]
    if clash:
        other = dataclasses.replace(spec, layout=other_layout(spec.layout)).input_shape
        hint = ""
        if all(not isinstance(h, int) or h == n for h, n in zip(dims[1:], other)):
            hint = f"; the graph looks {other_layout(spec.layout)}: use --layout {other_layout(spec.layout)}"
        raise ExportError(
            f"{source}: the graph's input {node.name!r} is {dims} but the declared spec gives {spec.layout} "
            f"{list(want)} plus a batch axis; --size H W and --color must match the graph{hint}"
        )
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    if batch is not None and batch != 1:
        raise ExportError(
            f"{source}: the graph's batch axis is fixed at {batch}; pneumoedge runs such graphs one image at a "
            "time, so export with batch 1 or a dynamic batch axis (torch.onnx.export(..., dynamic_axes=...))"
        )
    outputs = [o for o in graph.output if not o.name.startswith("pneumoedge_")]
    if len(outputs) != 1 or graph.output[0].name != outputs[0].name:
        raise ExportError(
            f"{source}: the graph has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); pneumoedge reads one "
            "(N, classes) output: export only the classifier's output"
        )
    return node.name, batch


def other_layout(layout: str) -> str:
    return "NHWC" if layout == "NCHW" else "NCHW"


def open_checked_session(model_or_path: Any, source: str, opset: int) -> Any:
    """A CPU session as the runtime makes it; an opset or kernel onnxruntime lacks is one line."""
    import onnxruntime as ort

    from pneumoedge.runtime.sessions import create_session

    data = model_or_path if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    try:
        return create_session(data, "cpu", threads=1)
    except Exception as exc:  # onnxruntime raises untyped errors (Fail, InvalidGraph, NotImplemented)
        text = str(exc)
        if "Opset" in text or "opset" in text:
            raise ExportError(
                f"{source}: the graph uses opset {opset}, which onnxruntime {ort.__version__} cannot run; "
                "re-export with a released opset it supports (e.g. torch.onnx.export(..., opset_version=17))"
            ) from None
        first = text.split("] : ")[-1].splitlines()[0][:300]
        raise ExportError(f"{source}: onnxruntime {ort.__version__} cannot run this graph: {first}") from None


def run_output0(session: Any, tensors: np.ndarray, fixed_batch: Optional[int], batch_size: int = 16) -> np.ndarray:
    """Output 0 for (N, ...) tensors; image by image when the batch axis is fixed."""
    name = session.get_inputs()[0].name
    out0 = session.get_outputs()[0].name
    step = 1 if fixed_batch else batch_size
    parts = [session.run([out0], {name: np.ascontiguousarray(tensors[i : i + step])})[0] for i in range(0, len(tensors), step)]
    return np.concatenate([np.asarray(p).reshape(len(p) if fixed_batch is None else 1, -1) for p in parts], axis=0)


def graph_without_additions(model: Any, original_outputs: int) -> bytes:
    """The graph's protobuf with pneumoedge's heatmap nodes, constants and outputs taken out."""
    import onnx

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    keep_nodes = [n for n in graph.node if not (n.name.startswith(PREFIX) or set(n.output) & {HEATMAP_OUTPUT, FEATURES_OUTPUT})]
    keep_init = [t for t in graph.initializer if not t.name.startswith(PREFIX)]
    keep_out = list(graph.output)[:original_outputs]
    del graph.node[:], graph.initializer[:], graph.output[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(keep_init)
    graph.output.extend(keep_out)
    return graph.SerializeToString(deterministic=True)


def wrap_onnx(
    source: Union[str, Path],
    out_path: Union[str, Path],
    *,
    spec: PreprocessSpec,
    labels: Sequence[str],
    head: str,
    images: Optional[Union[str, Path]] = None,
    threshold: Optional[float] = None,
    heatmap: bool = True,
    count: int = 32,
) -> WrapResult:
    """Check a foreign ONNX classifier against its declared spec and write it with its card.

    Args:
        source: the `.onnx` file (from torch.onnx.export or anywhere).
        out_path: the wrapped `.onnx` file to write.
        spec: the preprocessing its training used (layout NCHW for PyTorch).
        labels: label names in output order; labels[1] is the positive one of a binary head.
        head: "sigmoid" | "softmax" (the outputs are probabilities) or "logits".
        images: real images for the checks and the reported probabilities; generated phantoms when None.
        threshold: a binary decision threshold to record in the file's metadata.
        heatmap: add closed-form Grad-CAM outputs when the head allows it.

    Returns:
        WrapResult with the equality evidence. Raises ExportError (one line) on refusal.
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out_path)
    where = str(source)
    if out.resolve() == source.resolve():
        raise ExportError(f"{out}: --out is the source file; choose another path (the original is never overwritten)")
    model = load_onnx(source)
    opset = default_opset(model)
    _, fixed_batch = check_graph(model, spec, where)
    original = open_checked_session(model, where, opset)
    tensors, described = reference_tensors(spec, images, count=count)
    card = _declared_card(model, run_output0(original, tensors, fixed_batch), spec, labels, head, where, described)
    wrapped, explain, note = _with_heatmaps(model, spec, labels) if heatmap else (model, None, "heatmaps not requested")
    card = dataclasses.replace(card, explain=explain)
    card_json = card.to_dict()
    if threshold is not None and card.task == "binary":
        card_json["threshold"] = float(threshold)
    source_sha = sha256_file(source)
    origin = {
        "source": source.name, "sha256": source_sha, "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": opset, "wrapped_by": "pneumoedge export", "graph": "unchanged except metadata" + (" and heatmap outputs" if explain else ""),
    }
    _write(wrapped, out, card_json, origin)
    equality = _equality(original, out, tensors, fixed_batch, model, described)
    if explain is not None and not (equality["identical"] and equality["graph_unchanged"]):
        # Extra consumers may let onnxruntime fuse differently; the original output wins.
        log.warning("output 0 changed with heatmap outputs (max diff %.3g); wrapping without them", equality["max_abs_diff"])
        explain, note = None, "heatmap outputs left out: they changed output 0 under onnxruntime's optimisations"
        card = dataclasses.replace(card, explain=None)
        card_json.pop("explain", None)
        origin["graph"] = "unchanged except metadata"
        _write(model, out, card_json, origin)
        equality = _equality(original, out, tensors, fixed_batch, model, described)
    if not (equality["identical"] and equality["graph_unchanged"]):
        out.unlink(missing_ok=True)
        raise ExportError(f"{where}: the wrapped file does not reproduce the original ({equality}); nothing was written")
    result = WrapResult(out, card, source, source_sha, fixed_batch, opset, explain, note, equality)
    if images is not None:
        result.sample_probabilities = sample_probabilities(out, images)
    result.seconds = time.perf_counter() - started
    return result


def _declared_card(
    model: Any, raw: np.ndarray, spec: PreprocessSpec, labels: Sequence[str], head: str, where: str, described: str
) -> ModelCard:
    """The card of the declared head, refused when output 0 cannot be it (NaN, logits called probabilities)."""
    if not np.all(np.isfinite(raw)):
        raise ExportError(f"{where}: the model produced NaN or infinite outputs on {described}")
    try:
        card = card_for(spec, labels, head, raw.shape[1])
        check_probabilities(raw, head)
    except ExportError as exc:
        raise ExportError(f"{where}: output {model.graph.output[0].name!r} cannot be the declared head: {exc}") from None
    return card


def _with_heatmaps(model: Any, spec: PreprocessSpec, labels: Sequence[str]) -> tuple[Any, Optional[dict[str, Any]], str]:
    """(graph, card's explain entry, note): closed-form Grad-CAM outputs added when the head allows."""
    try:
        wrapped, explain = add_heatmap_outputs(model, spec, labels)
    except HeatmapUnavailable as exc:
        return model, None, str(exc)
    return wrapped, explain, f"heatmap outputs added ({explain['method']}, layer {explain['layer']!r}, {explain['score']})"


def _write(proto: Any, out: Path, card_json: dict[str, Any], origin: dict[str, Any]) -> None:
    """Save the graph with its card and origin in metadata_props."""
    import onnx

    props = {p.key: p.value for p in proto.metadata_props}
    props.update({ONNX_METADATA_KEY: json.dumps(card_json), ORIGIN_KEY: json.dumps(origin)})
    onnx.helper.set_model_props(proto, props)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))


def _equality(original: Any, out: Path, tensors: np.ndarray, fixed_batch: Optional[int], model: Any, described: str) -> dict[str, Any]:
    import onnx

    wrapped_model = onnx.load(str(out))
    graph_unchanged = graph_without_additions(wrapped_model, len(model.graph.output)) == model.graph.SerializeToString(deterministic=True)
    a = run_output0(original, tensors, fixed_batch)
    b = run_output0(open_checked_session(out, str(out), default_opset(model)), tensors, fixed_batch)
    return {
        "tensors": int(len(tensors)), "source": described, "identical": bool(np.array_equal(a, b)),
        "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()), "graph_unchanged": bool(graph_unchanged),
    }


def sample_probabilities(model: Union[str, Path], images: Union[str, Path], limit: int = 8) -> list[tuple[str, dict[str, float]]]:
    """Probabilities the runtime gives a few real files, to compare with the user's own pipeline."""
    from pneumoedge.runtime.loading import load

    ensemble = load(model, threads=1)
    files = image_files(images)[:limit]
    return [(p.source, p.probabilities) for p in ensemble.predict_many(files, batch_size=4) if p.status == "ok"]


def export_onnx(
    model: Union[str, Path],
    out: Union[str, Path],
    options: BundleOptions = BundleOptions(),
    *,
    spec: PreprocessSpec,
    labels: Sequence[str],
    head: str,
    progress: Progress = quiet,
) -> Union[WrapResult, BundleResult]:
    """Wrap `model` into `out`: one `.onnx` file, or a bundle folder through `build_bundle`.

    int8 goes through the same accuracy-checked search as Keras members, calibrated on
    `options.int8.calibration` (else `options.images`) preprocessed with the declared spec.
    Returns the WrapResult for one file, the BundleResult (its member's `export` is the
    WrapResult) for a bundle.
    """
    started = time.perf_counter()
    out = Path(out)
    options = declared_options(spec, options)
    declared = thresholds.parse(options.threshold)
    wrap = dict(spec=spec, labels=labels, head=head, images=options.images, heatmap=options.heatmaps,
                threshold=declared.value if declared.kind == "fixed" else None)
    if single_file(out, options):
        progress(f"wrapping {model} into {out} (checks and bit-for-bit comparison)")
        return wrap_onnx(model, out, **wrap)
    name = options.name or Path(model).stem
    with tempfile.TemporaryDirectory(prefix="pneumoedge-wrap-") as tmp:
        progress(f"wrapping {model} (checks and bit-for-bit comparison)")
        result = wrap_onnx(model, Path(tmp) / "model.onnx", **wrap)
        if options.int8.enabled and result.fixed_batch:
            raise ExportError("--int8 needs a graph with a dynamic batch axis (calibration runs batches); re-export with dynamic_axes")
        origin = {"kind": "wrapped onnx", "source": str(model), "sha256": result.source_sha256}
        source = MemberSource(result.onnx_path, name, spec, "fp32", 1.0, result.card.activation, explain=result.explain, origin=origin)
        record = {
            "created_by": "pneumoedge export (foreign ONNX model wrapped, spec declared by the user)",
            "source_model": str(model), "source_sha256": result.source_sha256, "synthetic": False,
            "notice": "a model pneumoedge did not train; its validation is the user's responsibility",
            "wrapped": result.equality, "heatmap": result.explain or result.heatmap_note,
        }
        bundle = build_bundle(
            out, [foreign_member(name, source, result, options)], Path(tmp), labels=labels, task=result.card.task,
            options=options, describe=lambda state: foreign_provenance(state, record), progress=progress, started=started,
        )
    result.onnx_path = out / f"{name}.fp32.onnx"
    return bundle
