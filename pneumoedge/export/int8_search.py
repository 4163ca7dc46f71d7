"""The int8 search: candidates checked against fp32, sensitive nodes kept in fp32, timed side by side.

`quantize_int8` quantizes with the first recipe and compares it with the fp32 model on images:
largest probability difference, label agreement, and with labelled data the accuracy/AUC
change. All candidates and fp32 are then timed side by side with onnxruntime on this CPU
(interleaved rounds, see `time_models`), so the choice of the fastest is fair on a shared
machine.

int8 is not free accuracy. On x86 without VNNI, u8s8 kernels can saturate (VPMADDUBSW) and a
larger CNN can disagree with fp32 on many labels. Nor is it free speed: for CNNs this small
the int8 kernels' quantize/requantize overhead can outweigh the cheaper arithmetic. Beside the
first recipe the search always tries `SPEED_RECIPES`; when none meets the tolerance it tries
the other type pairs, reduce_range, other calibration methods, and
finally keeps the most quantization-sensitive nodes in fp32: every quantized node is ranked by
the quantization error of its tensors (onnxruntime's `qdq_loss_debug`, on the closest QDQ
recipe), then the fp32 set grows in that order (1, 2, 4, ... nodes) until the tolerance holds,
and a bisection finds the fewest nodes that still meet it, within a time budget; the same
nodes are then tried on the speed recipes, and the FASTEST candidate that meets the tolerance
is kept. Every candidate tried is reported, and the search's trade-off curve (nodes in fp32
vs largest probability difference, agreement and latency) is in `QuantizationResult.curve`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import apply_activation, card_from_metadata
from pneumoedge.export.errors import QuantizationError
from pneumoedge.export.onnx_run import onnx_session, run_onnx
from pneumoedge.export.quantization import (
    CALIBRATION_METHODS,
    DEFAULT_RECIPE,
    OPS_TO_QUANTIZE,
    RECIPES,
    SPEED_RECIPES,
    Candidate,
    QuantizationResult,
    Recipe,
    Tolerance,
    _calibration_reader,
    preprocess_for_quantization,
    qdq_node_count,
    quantize_with,
)
from pneumoedge.validation.metrics import class_probabilities, classification_metrics

log = logging.getLogger(__name__)


def time_models(
    paths: Sequence[Union[str, Path]], sample: np.ndarray, *, rounds: int = 9, per_round: int = 8, threads: int = 1, batch: int = 1
) -> list[float]:
    """Latency in ms of one run (`batch` images) through each model with onnxruntime on this CPU, timed fairly.

    The models are timed in interleaved rounds (each round runs every model `per_round` times),
    and each model's figure is the median over rounds of the round's fastest run. On a shared
    CPU a neighbour's burst of load then hits all candidates alike instead of whichever was being
    timed at that moment, and one noisy round cannot decide. One intra-op thread by default:
    thread scheduling is the noisiest part on a busy 2-core machine, and it ranks kernels, not
    threading.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    x = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, feed)
    best: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (session, feed) in enumerate(zip(sessions, feeds)):
            fastest = np.inf
            for _ in range(per_round):
                t = time.perf_counter()
                session.run(None, feed)
                fastest = min(fastest, time.perf_counter() - t)
            best[i].append(fastest * 1000.0)
    return [float(np.median(b)) for b in best]


def time_model(path: Union[str, Path], sample: np.ndarray, *, rounds: int = 9, per_round: int = 8, threads: int = 1) -> float:
    """Latency in ms of one model (see `time_models`)."""
    return time_models([path], sample, rounds=rounds, per_round=per_round, threads=threads)[0]


def _probabilities(path: Path, tensors: np.ndarray, activation: str) -> np.ndarray:
    return class_probabilities(apply_activation(run_onnx(onnx_session(path, threads=2), tensors), activation))


def _decide(probs: np.ndarray, threshold: Optional[float]) -> np.ndarray:
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def sensitive_nodes(pre_path: Path, int8_path: Path, tensors: np.ndarray, limit: int) -> list[str]:
    """Nodes around the activations that quantization hurts most (lowest QDQ SQNR), most hurt first.

    Uses onnxruntime.quantization.qdq_loss_debug: both models are augmented to output their
    intermediate tensors, run on the same images, and each activation's signal-to-quantization-
    noise ratio is computed; the producer and consumers of the worst tensors are returned.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    name = onnx_session(pre_path).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="pneumoedge-qdq-debug-") as tmp:
        aug_float = Path(tmp) / "float_aug.onnx"
        aug_qdq = Path(tmp) / "qdq_aug.onnx"
        modify_model_output_intermediate_tensors(str(pre_path), str(aug_float))
        modify_model_output_intermediate_tensors(str(int8_path), str(aug_qdq))
        sample = tensors[: min(len(tensors), 16)]
        float_acts = collect_activations(str(aug_float), _calibration_reader(sample, name))
        qdq_acts = collect_activations(str(aug_qdq), _calibration_reader(sample, name))
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    ranked = sorted(
        (value.get("qdq_err", np.inf), tensor) for tensor, value in errors.items() if np.isfinite(value.get("qdq_err", np.inf))
    )
    graph = onnx.load(str(pre_path)).graph
    nodes: list[str] = []
    for _, tensor in ranked:
        for node in graph.node:
            if (tensor in node.output or tensor in node.input) and node.name and node.name not in nodes and node.op_type in OPS_TO_QUANTIZE:
                nodes.append(node.name)
        if len(nodes) >= limit:
            break
    return nodes[:limit]


def quantize_int8(
    fp32_path: Union[str, Path],
    out_path: Union[str, Path],
    calibration: np.ndarray,
    *,
    eval_tensors: Optional[np.ndarray] = None,
    y_true: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
    tolerance: Tolerance = Tolerance(),
    recipe: Union[str, Recipe] = DEFAULT_RECIPE,
    calibrate_method: Optional[str] = None,
    search: bool = True,
    budget_s: float = 180.0,
    on_fail: str = "refuse",
) -> QuantizationResult:
    """Quantize an exported fp32 ONNX model to int8 and check it against fp32.

    Args:
        fp32_path: an ONNX file written by `onnx_export` (its model card is kept in the int8 file).
        out_path: where the chosen int8 model goes.
        calibration: preprocessed image tensors (N, H, W, C) for calibration (real images).
        eval_tensors: images to compare fp32 and int8 on (default: the calibration images).
        y_true: class indices of `eval_tensors`, for the accuracy/AUC change.
        threshold: the binary decision threshold for label agreement (default 0.5).
        tolerance: what int8 must keep (largest probability difference, label agreement).
        recipe: the first recipe (a name from RECIPES, or a Recipe); `calibrate_method` overrides
            its calibration method.
        search: when the first recipe misses the tolerance, try the others (and fp32-kept
            sensitive nodes) and keep the fastest that meets it.
        budget_s: seconds the fp32-kept-nodes search may take (it stops with the closest so far).
        on_fail: "refuse" (raise QuantizationError) or "warn" (keep the closest candidate,
            with a warning in the result) when nothing meets the tolerance.
    """
    started = time.perf_counter()
    fp32 = Path(fp32_path)
    out = Path(out_path)
    if on_fail not in ("refuse", "warn"):
        raise QuantizationError(f"on_fail must be 'refuse' or 'warn', got {on_fail!r}")
    first = RECIPES.get(recipe) if isinstance(recipe, str) else recipe
    if first is None:
        raise QuantizationError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    if calibrate_method:
        if calibrate_method not in CALIBRATION_METHODS:
            raise QuantizationError(f"calibration method must be one of {CALIBRATION_METHODS}, got {calibrate_method!r}")
        first = replace(first, name=f"{first.name}[{calibrate_method}]", calibrate_method=calibrate_method)
    if calibration is None or len(calibration) == 0:
        raise QuantizationError("int8 needs calibration images (a folder of real images through the model's preprocessing)")
    card = card_from_metadata(onnx_session(fp32).get_modelmeta().custom_metadata_map, str(fp32))
    eval_tensors = calibration if eval_tensors is None else eval_tensors
    labels = list(card.labels)
    threshold = 0.5 if threshold is None and card.task == "binary" else threshold

    p_fp32 = _probabilities(fp32, eval_tensors, card.activation)
    fp32_pred = _decide(p_fp32, threshold)
    fp32_metrics = classification_metrics(y_true, p_fp32, labels, threshold) if y_true is not None else None

    tried: list[Candidate] = []
    curve: list[tuple[int, Candidate]] = []
    with tempfile.TemporaryDirectory(prefix="pneumoedge-int8-") as tmp:
        work = Path(tmp)
        pre = preprocess_for_quantization(fp32, work / "pre.onnx")

        def attempt(rec: Recipe) -> Candidate:
            path = work / f"candidate_{len(tried):02d}.onnx"  # node names may hold '/'; never in a file name
            log.info("int8: trying recipe %s", rec.name)
            try:
                quantize_with(rec, pre, path, calibration, card)
                p_int8 = _probabilities(path, eval_tensors, card.activation)
            except Exception as exc:  # a recipe onnxruntime cannot build or run is reported, not fatal
                candidate = Candidate(rec, np.inf, np.inf, 0.0, np.inf, 0, 0, False, error=f"{type(exc).__name__}: {exc}")
                tried.append(candidate)
                return candidate
            diff = np.abs(p_int8 - p_fp32)
            agreement = float((_decide(p_int8, threshold) == fp32_pred).mean())
            candidate = Candidate(
                recipe=rec,
                max_prob_diff=float(diff.max()),
                mean_prob_diff=float(diff.mean()),
                agreement=agreement,
                latency_ms=np.nan,  # timed below, all candidates together
                size_bytes=path.stat().st_size,
                qdq_nodes=qdq_node_count(path),
                meets=bool(diff.max() <= tolerance.max_prob_diff and agreement >= tolerance.min_agreement),
                path=path,
            )
            if y_true is not None:
                m = classification_metrics(y_true, p_int8, labels, threshold)
                candidate.accuracy, candidate.roc_auc = m["accuracy"], m["roc_auc"]
            tried.append(candidate)
            log.info("int8 %s: max diff %.4f, agreement %.3f", rec.name, candidate.max_prob_diff, agreement)
            return candidate

        attempt(first)
        if search:
            for name in SPEED_RECIPES:  # possibly faster: always compared, the fastest passing one wins
                if name != first.name:
                    attempt(RECIPES[name])
        if search and not any(c.meets for c in tried):
            for rec in RECIPES.values():
                if rec.name != first.name and rec.name not in SPEED_RECIPES:
                    attempt(rec)
            if not any(c.meets for c in tried):
                # qdq_loss_debug matches QDQ pairs, so the fp32-kept-nodes step builds on a QDQ recipe.
                qdq = (c for c in tried if c.error is None and c.recipe.quant_format == "qdq")
                base = min(qdq, key=lambda c: c.max_prob_diff, default=None)
                if base is not None:
                    curve = _grow_fp32_set(pre, base, eval_tensors, attempt, started + budget_s)
        usable = [c for c in tried if c.error is None]
        latencies = time_models([fp32, *(c.path for c in usable)], eval_tensors)
        fp32_latency = latencies[0]
        for c, ms in zip(usable, latencies[1:]):
            c.latency_ms = ms
        meeting = [c for c in tried if c.meets]
        warnings: list[str] = []
        if meeting:
            chosen = min(meeting, key=lambda c: c.latency_ms)
        else:
            usable = [c for c in tried if c.error is None]
            chosen = min(usable, key=lambda c: (-c.agreement, c.max_prob_diff)) if usable else None
            summary = "; ".join(
                f"{c.recipe.name}: max diff {c.max_prob_diff:.3g}, agreement {c.agreement:.3f}" if c.error is None else f"{c.recipe.name}: {c.error}"
                for c in tried
            )
            message = (
                f"no int8 recipe meets the tolerance (max prob diff <= {tolerance.max_prob_diff}, "
                f"agreement >= {tolerance.min_agreement}) on {len(eval_tensors)} images. Tried: {summary}"
            )
            if on_fail == "refuse" or chosen is None:
                raise QuantizationError(message + ". Keep the fp32 model, or loosen the tolerance knowingly.")
            warnings.append(message)
        if chosen is not None and chosen.latency_ms > fp32_latency:
            warnings.append(
                f"int8 ({chosen.latency_ms:.2f} ms) is not faster than fp32 ({fp32_latency:.2f} ms) on this CPU for this model"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen.path, out)
        for c in tried:
            c.path = out if c is chosen else None
    return QuantizationResult(
        int8_path=out,
        chosen=chosen,
        tried=tried,
        fp32_size_bytes=fp32.stat().st_size,
        fp32_latency_ms=fp32_latency,
        fp32_accuracy=fp32_metrics["accuracy"] if fp32_metrics else None,
        fp32_roc_auc=fp32_metrics["roc_auc"] if fp32_metrics else None,
        images=len(eval_tensors),
        calibration_images=len(calibration),
        tolerance=tolerance,
        seconds=time.perf_counter() - started,
        warnings=warnings,
        curve=[{"fp32_nodes": k, "max_prob_diff": c.max_prob_diff, "agreement": c.agreement, "latency_ms": c.latency_ms, "meets": c.meets}
               for k, c in curve if c.error is None],
    )


def _grow_fp32_set(pre: Path, base: Candidate, tensors: np.ndarray, attempt, deadline: float) -> list[tuple[int, Candidate]]:
    """Keep the most sensitive nodes in fp32, growing the set (1, 2, 4, ...) then bisecting to the fewest that pass.

    Returns the (nodes kept in fp32, candidate) points tried, the trade-off curve.
    """
    try:
        ranked = sensitive_nodes(pre, base.path, tensors, limit=1_000_000)
    except Exception as exc:  # the debugging tools are best effort
        log.warning("qdq_loss_debug failed: %s", exc)
        return []
    curve: list[tuple[int, Candidate]] = []

    def at(count: int, recipe: Recipe) -> Candidate:
        nodes = tuple(ranked[:count])
        candidate = attempt(replace(recipe, name=f"{recipe.name}+fp32[{count} most sensitive]", exclude=nodes))
        if recipe is base.recipe:
            curve.append((count, candidate))
        return candidate

    failing, passing, count = 0, None, 1
    while ranked and time.perf_counter() < deadline:
        if at(count, base.recipe).meets:
            passing = count
            break
        failing = count
        if count == len(ranked):
            break
        count = min(2 * count, len(ranked))
    while passing is not None and passing - failing > 1 and time.perf_counter() < deadline:
        middle = (failing + passing) // 2
        if at(middle, base.recipe).meets:
            passing = middle
        else:
            failing = middle
    if passing is not None:
        # The same nodes kept in fp32 on the faster recipes too: the sensitive nodes (typically the
        # first convolutions) are what breaks them, and the fastest passing candidate wins.
        for name in SPEED_RECIPES:
            if name != base.recipe.name and time.perf_counter() < deadline:
                at(passing, RECIPES[name])
    curve.sort(key=lambda point: point[0])
    return curve
