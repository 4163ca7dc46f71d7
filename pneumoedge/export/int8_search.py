"""The int8 search: candidates checked against fp32, the nodes that move the output kept in fp32.

`quantize_int8` quantizes with the first recipe and compares it with the fp32 model on images:
largest probability difference, label agreement, and with labelled data the accuracy/AUC
change. Beside the first recipe it tries a few others (`BASE_RECIPES`: the QOperator and
reduce-range ones measured fast on AVX2, matrix products only, u8u8, symmetric s8s8) until one
meets the tolerance. When none does, it keeps in fp32 the nodes whose quantization moves the
OUTPUT most:

1. ranking by effect: only a group of nodes is quantized, everything else stays fp32, and the
   root-mean-square change of the output probabilities on the first `rank_images` images is
   that group's effect; groups of consecutive nodes are split where the effect is largest (group
   testing), so a few dozen trials find the decisive nodes among hundreds. A tensor's own
   quantization error (SQNR) was a poor guide: on a real Xception and a MobileNetV2 the decisive
   node ranked last by it (issue 18).
2. the fp32 set grows one node at a time: each step leaves out, in turn, each of the `POOL`
   best-ranked nodes not yet in fp32 (checked on all images) and keeps the one that helps most,
   until the tolerance holds (or `STALE_STEPS` steps in a row bring nothing better); then the
   same nodes on the other base recipes. On a CPU with fast int8 kernels (VNNI/AMX: u8 x s8
   products) the growth builds on a u8s8 recipe: on the zoo's Xception a u8u8 member met the
   tolerance with one node in fp32 but ran no faster than fp32, while u8s8 members ran at about
   half of fp32's latency (benchmarks/RESULTS.md).

The work is counted (`SearchBudget`: trials and images), never seconds, so an export gives the
same int8 file on a quiet and on a busy machine; an optional wall-clock cap stops it early with
a warning that says so. The candidate kept is decided without timing, by a fixed preference:
fewest nodes in fp32, then the order of the recipes tried (the user's first recipe first). The
candidates are timed side by side for the report (`time_models`), and a slower-than-fp32 result
is a warning, or a refusal when `max_latency_ratio` is given.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import ModelCard, apply_activation, card_from_metadata
from pneumoedge.export.errors import QuantizationError
from pneumoedge.export.onnx_run import onnx_session, run_onnx
from pneumoedge.export.quantization import (
    CALIBRATION_METHODS,
    DEFAULT_RECIPE,
    RECIPES,
    SPEED_RECIPES,
    Candidate,
    QuantizationResult,
    Recipe,
    SearchBudget,
    preprocess_for_quantization,
    qdq_node_count,
    quantizable_nodes,
    quantize_with,
)
from pneumoedge.int8_tolerance import Tolerance
from pneumoedge.runtime.machine import cpu_info
from pneumoedge.validation.metrics import class_probabilities, classification_metrics

log = logging.getLogger(__name__)

#: Tried beside the first recipe before any node is kept in fp32 (in this order).
BASE_RECIPES = (*SPEED_RECIPES, "u8s8_compute_only", "u8u8", "s8s8_symmetric")
#: Nodes (the best-ranked not yet in fp32) each growth step tries leaving out.
POOL = 4
#: Growth steps in a row without a better candidate after which the growth stops.
STALE_STEPS = 2
#: Groups of consecutive nodes the effect ranking starts from.
FIRST_GROUPS = 8

#: The search's clock: only the optional wall-clock cap reads it (a test swaps in a slow one).
_clock: Callable[[], float] = time.perf_counter


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


@dataclass
class _Search:
    """One search's state: the model prepared for quantization, the fp32 reference, the work counted."""

    pre: Path
    work: Path
    card: ModelCard
    calibration: np.ndarray
    tensors: np.ndarray
    p_fp32: np.ndarray
    threshold: Optional[float]
    tolerance: Tolerance
    budget: SearchBudget
    y_true: Optional[np.ndarray] = None
    deadline: Optional[float] = None
    tried: list[Candidate] = field(default_factory=list)
    rank_trials: int = 0
    stopped: Optional[str] = None

    @property
    def trials(self) -> int:
        return len(self.tried) + self.rank_trials

    def may_try(self, ranking: bool = False) -> bool:
        """Whether the budget allows one more trial (and, once not, why: kept in `stopped`)."""
        if self.trials >= self.budget.trials:
            self.stopped = self.stopped or f"the search budget of {self.budget.trials} trials was used"
            return False
        if ranking and self.rank_trials >= self.budget.rank_trials:
            return False
        if self.deadline is not None and _clock() >= self.deadline:
            self.stopped = (
                f"the wall-clock cap of {self.budget.time_limit_s:g} s stopped the search after {self.trials} trials: "
                "this result depends on the machine's speed and load (leave the cap out for a reproducible export)"
            )
            return False
        return True

    def _quantize(self, recipe: Recipe, path: Path) -> None:
        quantize_with(recipe, self.pre, path, self.calibration, self.card, cache=self.work)

    def attempt(self, recipe: Recipe, fp32_nodes: int = 0) -> Candidate:
        """Quantize with `recipe` and check it on all images (one trial)."""
        path = self.work / f"candidate_{len(self.tried):03d}.onnx"  # node names may hold '/'; never in a file name
        log.info("int8: trying %s", recipe.name)
        try:
            self._quantize(recipe, path)
            p_int8 = _probabilities(path, self.tensors, self.card.activation)
        except Exception as exc:  # a recipe onnxruntime cannot build or run is reported, not fatal
            candidate = Candidate(recipe, np.inf, np.inf, 0.0, np.nan, 0, 0, False, fp32_nodes=fp32_nodes, error=f"{type(exc).__name__}: {exc}")
            self.tried.append(candidate)
            return candidate
        diff = np.abs(p_int8 - self.p_fp32)
        agreement = float((_decide(p_int8, self.threshold) == _decide(self.p_fp32, self.threshold)).mean())
        candidate = Candidate(
            recipe=recipe,
            max_prob_diff=float(diff.max()),
            mean_prob_diff=float(diff.mean()),
            agreement=agreement,
            latency_ms=np.nan,  # timed later, side by side, for the report only
            size_bytes=path.stat().st_size,
            qdq_nodes=qdq_node_count(path),
            meets=self.tolerance.holds(float(diff.max()), agreement),
            fp32_nodes=fp32_nodes,
            path=path,
        )
        if self.y_true is not None:
            m = classification_metrics(self.y_true, p_int8, list(self.card.labels), self.threshold)
            candidate.accuracy, candidate.roc_auc = m["accuracy"], m["roc_auc"]
        self.tried.append(candidate)
        log.info("int8 %s: max diff %.4f, agreement %.3f", recipe.name, candidate.max_prob_diff, agreement)
        return candidate

    def effect(self, recipe: Recipe) -> float:
        """Root-mean-square output probability change of `recipe` on the first `rank_images` images (one ranking trial).

        RMS, not the largest change: single nodes' effects are small and close together, the largest
        over a few images is mostly noise, while mean squared changes of independent errors add up.
        """
        self.rank_trials += 1
        path = self.work / "ranking.onnx"
        n = max(1, min(len(self.tensors), self.budget.rank_images))
        try:
            self._quantize(recipe, path)
            p = _probabilities(path, self.tensors[:n], self.card.activation)
        except Exception as exc:  # best effort: an unbuildable group ranks last
            log.info("int8 ranking trial %s failed: %s", recipe.name, exc)
            return -1.0
        return float(np.sqrt(np.mean(np.square(p - self.p_fp32[:n]))))


# Over 80 lines by its Args docstring (25 lines); the body is named steps (_first_recipe, _search, _choose).
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
    budget: SearchBudget = SearchBudget(),
    budget_s: Optional[float] = None,
    max_latency_ratio: Optional[float] = None,
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
        search: when the first recipe misses the tolerance, try the others and keep the nodes that
            move the output most in fp32.
        budget: the search's work (trials, images, fp32 nodes): the same inputs give the same result.
        budget_s: an optional wall-clock cap in seconds (overrides `budget.time_limit_s`); when it
            stops the search the result's warnings say so. None: no cap (reproducible).
        max_latency_ratio: when given, int8 must also run at most this share of fp32's latency
            (batch 1, timed side by side here), or it counts as not meeting the tolerance.
        on_fail: "refuse" (raise QuantizationError) or "warn" (keep the closest candidate,
            with a warning in the result) when nothing meets the tolerance.
    """
    started = time.perf_counter()
    first = _first_recipe(recipe, calibrate_method, on_fail)
    if calibration is None or len(calibration) == 0:
        raise QuantizationError("int8 needs calibration images (a folder of real images through the model's preprocessing)")
    if budget_s is not None:
        budget = replace(budget, time_limit_s=budget_s)
    fp32, out = Path(fp32_path), Path(out_path)
    card = card_from_metadata(onnx_session(fp32).get_modelmeta().custom_metadata_map, str(fp32))
    tensors = calibration if eval_tensors is None else eval_tensors
    threshold = 0.5 if threshold is None and card.task == "binary" else threshold
    p_fp32 = _probabilities(fp32, tensors, card.activation)
    fp32_metrics = classification_metrics(y_true, p_fp32, list(card.labels), threshold) if y_true is not None else None

    with tempfile.TemporaryDirectory(prefix="pneumoedge-int8-") as tmp:
        work = Path(tmp)
        state = _Search(
            pre=preprocess_for_quantization(fp32, work / "pre.onnx"), work=work, card=card, calibration=calibration,
            tensors=tensors, p_fp32=p_fp32, threshold=threshold, tolerance=tolerance, budget=budget, y_true=y_true,
            deadline=None if budget.time_limit_s is None else _clock() + budget.time_limit_s,
        )
        curve, ranking = _search(state, first, search)
        fp32_latency = _time_for_report(fp32, state, curve)
        chosen, warnings = _choose(state, fp32_latency, max_latency_ratio, on_fail)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen.path, out)
        for c in state.tried:
            c.path = out if c is chosen else None
    return QuantizationResult(
        int8_path=out,
        chosen=chosen,
        tried=state.tried,
        fp32_size_bytes=fp32.stat().st_size,
        fp32_latency_ms=fp32_latency,
        fp32_accuracy=fp32_metrics["accuracy"] if fp32_metrics else None,
        fp32_roc_auc=fp32_metrics["roc_auc"] if fp32_metrics else None,
        images=len(tensors),
        calibration_images=len(calibration),
        tolerance=tolerance,
        seconds=time.perf_counter() - started,
        warnings=warnings,
        curve=[_curve_point(c) for c in curve],
        ranking=ranking,
        budget=budget,
        trials=state.trials,
    )


def _curve_point(c: Candidate) -> dict[str, Any]:
    """One point of the report's trade-off curve: nodes kept in fp32 against the output change."""
    return {"fp32_nodes": c.fp32_nodes, "nodes": list(c.recipe.exclude), "max_prob_diff": c.max_prob_diff, "agreement": c.agreement,
            "latency_ms": c.latency_ms if np.isfinite(c.latency_ms) else None, "meets": c.meets}


def _first_recipe(recipe: Union[str, Recipe], calibrate_method: Optional[str], on_fail: str) -> Recipe:
    """The user's first recipe, checked (unknown names and methods are user errors)."""
    if on_fail not in ("refuse", "warn"):
        raise QuantizationError(f"on_fail must be 'refuse' or 'warn', got {on_fail!r}")
    first = RECIPES.get(recipe) if isinstance(recipe, str) else recipe
    if first is None:
        raise QuantizationError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    if calibrate_method:
        if calibrate_method not in CALIBRATION_METHODS:
            raise QuantizationError(f"calibration method must be one of {CALIBRATION_METHODS}, got {calibrate_method!r}")
        first = replace(first, name=f"{first.name}[{calibrate_method}]", calibrate_method=calibrate_method)
    return first


def _search(state: _Search, first: Recipe, search: bool) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Recipes, then (when none meets) the fp32 set grown by effect, then the remaining recipes.

    Returns the trade-off curve (the base recipe's candidates by nodes in fp32) and the ranking.
    """
    state.attempt(first)
    if not search:
        return [], []
    for name in BASE_RECIPES:
        if name != first.name and not any(c.meets for c in state.tried) and state.may_try():
            state.attempt(RECIPES[name])
    curve: list[Candidate] = []
    ranking: list[dict[str, Any]] = []
    if not any(c.meets for c in state.tried):
        qdq = [c for c in state.tried if c.error is None and c.recipe.quant_format == "qdq"]
        if cpu_info().fast_int8:  # VNNI/AMX kernels multiply u8 x s8: a u8u8 base would meet the tolerance slowly
            qdq = [c for c in qdq if (c.recipe.activation_type, c.recipe.weight_type) == ("uint8", "int8")] or qdq
        base = min(qdq, key=lambda c: c.max_prob_diff, default=None)  # first of equals: deterministic
        if base is not None and state.may_try():
            ranking = rank_by_effect(state, base.recipe)
            curve = [base, *_grow_fp32_set(state, base.recipe, [r["node"] for r in ranking], start=base)]
    if not any(c.meets for c in state.tried):
        for rec in RECIPES.values():
            if rec.name != first.name and rec.name not in BASE_RECIPES and not any(c.meets for c in state.tried) and state.may_try():
                state.attempt(rec)
    return sorted(curve, key=lambda c: c.fp32_nodes), ranking


def rank_by_effect(state: _Search, base: Recipe) -> list[dict[str, Any]]:
    """Nodes ranked by how much quantizing them (alone, all else fp32) moves the output, largest first.

    Group testing within `budget.rank_trials`: consecutive nodes start in `FIRST_GROUPS` groups,
    and the group with the largest effect is split in halves and both measured, until the trials
    are used or every leading group is one node. A node's effect is its smallest measured group's.
    """
    nodes = quantizable_nodes(state.pre, base.quantized_ops)
    names = [n for n, _ in nodes]
    op_types = dict(nodes)
    position = {n: i for i, n in enumerate(names)}

    def measure(group: tuple[str, ...]) -> float:
        keep = set(group)
        return state.effect(replace(base, name=f"{base.name}[only {len(group)}]", exclude=tuple(n for n in names if n not in keep)))

    size = max(1, -(-len(names) // FIRST_GROUPS))
    scored: list[tuple[float, tuple[str, ...]]] = []
    for start in range(0, len(names), size):
        if not (state.may_try() and state.may_try(ranking=True)):
            break
        group = tuple(names[start : start + size])
        scored.append((measure(group), group))
    while True:
        splittable = [g for g in scored if len(g[1]) > 1]
        if not splittable or not (state.may_try() and state.may_try(ranking=True)):
            break
        worst = max(splittable, key=lambda g: (g[0], -position[g[1][0]]))
        if worst[0] < max((g[0] for g in scored if len(g[1]) == 1), default=-np.inf):
            break  # the single nodes found already outrank every group left
        scored.remove(worst)
        half = len(worst[1]) // 2
        for part in (worst[1][:half], worst[1][half:]):
            scored.append((measure(part) if state.may_try(ranking=True) else worst[0], part))
    scored.sort(key=lambda g: (-g[0], len(g[1]), position[g[1][0]]))
    return [{"node": n, "op_type": op_types[n], "position": position[n], "effect": round(effect, 6), "group": len(group)}
            for effect, group in scored for n in group]


def _grow_fp32_set(state: _Search, base: Recipe, ranked: list[str], start: Optional[Candidate] = None) -> list[Candidate]:
    """Keep nodes in fp32 one at a time: each step leaves out, in turn, each of the `POOL` best-ranked
    nodes not yet kept, checked on all images, and keeps the one that helps most (greedy).

    Why not simply the top k of the ranking: on the zoo the nodes' errors partly cancel, so keeping
    the single top node in fp32 could make the output worse (MobileNetV2: 0.086 -> 0.143) and the
    curve over k was not monotonic; measuring each step's choice keeps the fp32 set small.
    Returns the base recipe's path (the trade-off curve); the passing set, if any, is then tried
    on the other base recipes too.
    """
    curve: list[Candidate] = []
    kept: list[str] = []

    def at(nodes: list[str], recipe: Recipe) -> Candidate:
        return state.attempt(replace(recipe, name=f"{recipe.name}+fp32[{len(nodes)} by effect]", exclude=tuple(nodes)), fp32_nodes=len(nodes))

    def worse(c: Candidate) -> tuple[float, float]:
        return (-c.agreement, c.max_prob_diff)

    passing, best_so_far, stale = None, start, 0
    while passing is None and stale < STALE_STEPS and len(kept) < min(len(ranked), state.budget.max_fp32_nodes):
        best: Optional[tuple[Candidate, str]] = None
        for node in [n for n in ranked if n not in kept][:POOL]:
            if not state.may_try():
                break
            candidate = at([*kept, node], base)
            if best is None or worse(candidate) < worse(best[0]):
                best = (candidate, node)
            if candidate.meets:
                break
        if best is None:
            break
        kept.append(best[1])
        curve.append(best[0])
        passing = kept if best[0].meets else None
        # Errors spread over the whole network (the zoo's ResNet50): no node helps; leave the trials to other recipes.
        stale = 0 if best_so_far is None or worse(best[0]) < worse(best_so_far) else stale + 1
        best_so_far = best[0] if stale == 0 else best_so_far
    if passing is not None:  # the same nodes on the other base recipes
        for name in BASE_RECIPES:
            if RECIPES[name] is not base and state.may_try():
                at(passing, RECIPES[name])
    return curve


def _time_for_report(fp32: Path, state: _Search, curve: list[Candidate]) -> float:
    """Time fp32 and the candidates worth reporting side by side (batch 1); returns fp32's latency.

    Timed: the curve, every candidate that meets the tolerance, and the closest of the others.
    """
    usable = [c for c in state.tried if c.error is None]
    closest = min(usable, key=lambda c: (-c.agreement, c.max_prob_diff), default=None)
    timed = [c for c in usable if c.meets or c in curve or c is closest]
    latencies = time_models([fp32, *(c.path for c in timed)], state.tensors, rounds=5, per_round=4)
    for c, ms in zip(timed, latencies[1:]):
        c.latency_ms = ms
    return latencies[0]


def _choose(state: _Search, fp32_latency: float, max_latency_ratio: Optional[float], on_fail: str) -> tuple[Candidate, list[str]]:
    """The candidate kept, decided without timing (fewest fp32 nodes, then the order tried), and warnings."""
    warnings = [f"int8 search stopped early: {state.stopped}"] if state.stopped and "wall-clock" in state.stopped else []
    meeting = [c for c in state.tried if c.meets]
    chosen = min(meeting, key=lambda c: c.fp32_nodes) if meeting else None  # min keeps the first of equals
    problem = None
    if chosen is None:
        summary = "; ".join(
            f"{c.recipe.name}: max diff {c.max_prob_diff:.3g}, agreement {c.agreement:.3f}" if c.error is None else f"{c.recipe.name}: {c.error}"
            for c in state.tried
        )
        stop = f" ({state.stopped})" if state.stopped else ""
        problem = (
            f"no int8 recipe meets the tolerance (max prob diff <= {state.tolerance.max_prob_diff}, "
            f"agreement >= {state.tolerance.min_agreement}) on {len(state.tensors)} images in {state.trials} trials{stop}. Tried: {summary}"
        )
    elif max_latency_ratio is not None and chosen.latency_ms > max_latency_ratio * fp32_latency:
        problem = (
            f"int8 meets the accuracy tolerance but runs at {chosen.latency_ms / fp32_latency:.2f}x fp32's latency "
            f"({chosen.latency_ms:.2f} vs {fp32_latency:.2f} ms, batch 1, this CPU), above the {max_latency_ratio:g}x asked"
        )
        chosen.meets = False
    if problem is not None:
        usable = [c for c in state.tried if c.error is None]
        if on_fail == "refuse" or not usable:
            raise QuantizationError(problem + ". Keep the fp32 model, or loosen the tolerance knowingly.")
        warnings.append(problem)
        if chosen is None:
            chosen = min(usable, key=lambda c: (-c.agreement, c.max_prob_diff))
    if np.isfinite(chosen.latency_ms) and chosen.latency_ms > fp32_latency:
        warnings.append(f"int8 ({chosen.latency_ms:.2f} ms) is not faster than fp32 ({fp32_latency:.2f} ms) on this CPU for this model")
    return chosen, warnings
