"""THE bundle builder: every way into a bundle ends in `build_bundle` (tf2onnx's from_* -> _convert_common).

The front doors make checked fp32 members and say what is special about them:
`pipeline.export_runs` (training runs), `foreign.export_foreign` (a Keras file),
`onnx_wrap.export_onnx` (a foreign ONNX) and `composition.compose_bundle` (`bundle create`,
members carried over with their int8 twins and statistics). `build_bundle` does the rest, in
one order, with one options object:

    threshold (int8's label agreement is measured at it) -> int8 (+ heatmap check) -> int8
    ensemble check -> out-of-distribution statistics -> provenance -> write_bundle

Nothing here imports TensorFlow; int8 and the statistics need onnx/onnxruntime only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np

from pneumoedge import thresholds
from pneumoedge.bundle import ONNX_METADATA_KEY, Manifest, MemberSource, write_bundle
from pneumoedge.export.errors import ExportError, QuantizationError
from pneumoedge.export.onnx_export import DEFAULT_PARITY_TOLERANCE
from pneumoedge.export.onnx_run import ensemble_probabilities
from pneumoedge.export.quantization import DEFAULT_RECIPE, QuantizationResult
from pneumoedge.int8_tolerance import Tolerance
from pneumoedge.export.report import Progress, quiet
from pneumoedge.export.tensors import image_files, load_tensors
from pneumoedge.runtime.machine import cpu_info
from pneumoedge.validation.metrics import classification_metrics

#: Images used at most to calibrate int8 (evenly picked).
CALIBRATION_IMAGES = 64
#: Fewer reference images than this give no out-of-distribution statistics (no stable covariance).
MIN_REFERENCE_IMAGES = 10


@dataclass(frozen=True)
class Int8Options:
    """Whether and how to add int8 members (`int8_search.quantize_int8`)."""

    enabled: bool = False
    tolerance: Tolerance = field(default_factory=Tolerance)
    recipe: str = DEFAULT_RECIPE
    calibrate_method: Optional[str] = None
    #: Try other recipes (and fp32-kept nodes) when the first misses the tolerance.
    search: bool = True
    #: Optional wall-clock cap on the int8 search (None: none; its work is counted in trials, so the result is reproducible).
    budget_s: Optional[float] = None
    #: "warn": keep fp32 as the default precision when int8 misses; "refuse": raise.
    on_fail: str = "warn"
    #: Calibration images (a folder); None: each front door's own (a run's training split, --images).
    calibration: Optional[Path] = None


@dataclass(frozen=True)
class BundleOptions:
    """Everything a user decides about a bundle, for every front door."""

    int8: Int8Options = field(default_factory=Int8Options)
    #: Largest accepted |p_keras - p_onnx| (Keras doors).
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE
    #: Images for the parity and wrapping checks (a folder); None: the door's own or phantoms.
    images: Optional[Path] = None
    heatmaps: bool = True
    heatmap_layer: Optional[str] = None
    #: Fit out-of-distribution statistics; `reference` (a folder) for foreign models.
    ood: bool = True
    reference: Optional[Path] = None
    #: The threshold grammar (`pneumoedge.thresholds`); None: the door's default.
    threshold: Optional[str] = None
    name: Optional[str] = None
    #: Recorded in the manifest's provenance, over what the door records.
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportedMember:
    """One checked fp32 graph from a front door, and what the builder needs to finish it."""

    name: str
    source: MemberSource
    #: The door's check of the graph (`ExportResult` parity, `WrapResult` equality), reported.
    export: Any
    #: The door's own calibration images, loaded when int8 is asked and no folder is given.
    calibration: Optional[Callable[[], np.ndarray]] = None
    #: Images like its training data, for the out-of-distribution statistics, and how to say so.
    references: Sequence[Path] = ()
    references_described: str = ""
    #: Members carried over as they are (`bundle create`): the int8 twin is not made again.
    carried: Sequence[MemberSource] = ()
    int8: Optional[QuantizationResult] = None

    @property
    def weight(self) -> float:
        return self.source.weight

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "weight": self.weight, "export": self.export.to_dict() if self.export is not None else None}
        if self.int8 is not None:
            data["int8"] = self.int8.to_dict()
        return data


class Validation(Protocol):
    """Labelled data the ensemble is measured on: its threshold, metrics and int8 check."""

    y: np.ndarray
    described: str

    def probabilities(self, sources: Sequence[MemberSource]) -> np.ndarray:
        """The weighted ensemble of `sources` (one precision) on the data: (N, K) probabilities."""

    def tensors_for(self, name: str) -> Optional[np.ndarray]:
        """A member's preprocessed images of the data (int8 compares fp32 on them), when in memory."""


@dataclass
class TensorValidation:
    """Validation images already preprocessed for each member (a run's recorded split)."""

    y: np.ndarray
    tensors: dict[str, np.ndarray]
    described: str

    def probabilities(self, sources: Sequence[MemberSource]) -> np.ndarray:
        return ensemble_probabilities([s.onnx_path for s in sources], [s.weight for s in sources],
                                      [s.activation for s in sources], [self.tensors[s.name] for s in sources])

    def tensors_for(self, name: str) -> Optional[np.ndarray]:
        return self.tensors.get(name)


@dataclass
class BuildState:
    """What the builder found, for the door's provenance record."""

    members: list[ExportedMember]
    metrics: dict[str, Any]
    threshold: Optional[dict[str, Any]]
    validation: Optional[Validation]


@dataclass
class BundleResult:
    bundle_dir: Path
    manifest: Manifest
    members: list[ExportedMember]
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


#: A door's answer when the threshold rule cannot be applied here (no rule, or no labelled data).
ThresholdFallback = Callable[[Optional[thresholds.ThresholdRule]], dict[str, Any]]
Describe = Callable[[BuildState], dict[str, Any]]


def build_bundle(
    out: Union[str, Path],
    members: Sequence[ExportedMember],
    work: Path,
    *,
    labels: Sequence[str],
    task: str,
    options: BundleOptions,
    describe: Describe,
    validation: Optional[Validation] = None,
    fallback: Optional[ThresholdFallback] = None,
    carried_default: str = "fp32",
    progress: Progress = quiet,
    started: Optional[float] = None,
    steps: Optional[dict[str, float]] = None,
) -> BundleResult:
    """Finish checked fp32 members into one bundle at `out`.

    Args:
        out: the bundle folder.
        members: from a front door, in manifest order.
        work: a scratch folder that lives until the bundle is written (int8 and statistics files).
        options: the user's choices; `options.int8.enabled` quantizes every member.
        describe: the door's provenance record from what was found (`BuildState`); the builder
            adds the out-of-distribution summary.
        validation: labelled data for the threshold, the metrics and the int8 ensemble check.
        fallback: the threshold when the rule is None or needs data that is not there.
        carried_default: the default precision of members carried over as they are.

    Returns:
        BundleResult; the default precision is int8 only when every new int8 member and the
        int8 ensemble met the tolerance.
    """
    started = time.perf_counter() if started is None else started
    steps = {} if steps is None else steps
    members = list(members)
    fp32 = [m.source for m in members]
    carried = [s for m in members for s in m.carried]
    measured = [s for s in fp32 + carried if s.precision == carried_default]
    p_measured = validation.probabilities(measured) if validation is not None else None
    threshold_info = _threshold(task, options.threshold, validation, p_measured, fallback)
    threshold = threshold_info["threshold"] if threshold_info else None
    metrics: dict[str, Any] = {}
    if validation is not None and p_measured is not None:
        metrics[f"validation_{carried_default}"] = classification_metrics(validation.y, p_measured, labels, threshold)
    default = carried_default
    int8_sources: list[MemberSource] = []
    withheld: Optional[str] = None
    if options.int8.enabled:
        int8_sources = [_quantize(m, options.int8, validation, threshold, work, steps, progress) for m in members]
        int8_ok = all(m.int8 is not None and m.int8.ok for m in members)
        if validation is not None and p_measured is not None:
            int8_ok = _ensemble_check(validation, int8_sources, p_measured, labels, threshold, options.int8.tolerance, metrics, progress) and int8_ok
        if int8_ok:
            default = "int8"
        else:
            # An int8 file that misses the tolerance is never written: nobody can run it by mistake
            # (--precision int8), and the provenance says why there is none.
            withheld = _why_withheld(members, metrics, options.int8.tolerance)
            progress(f"  int8 not written: {withheld}")
            int8_sources = []
    sources = fp32 + int8_sources + carried
    ood_summary: dict[str, Any] = {}
    if options.ood:
        sources = _fit_ood(members, sources, work, ood_summary, progress)
    record = describe(BuildState(members, metrics, threshold_info, validation))
    record.update(options.provenance)
    if int8_sources:
        _record_int8_timing(record, members)
    elif withheld is not None:
        record["int8_withheld"] = withheld
    if ood_summary:
        record["out_of_distribution"] = ood_summary
    out = Path(out)
    manifest = write_bundle(
        out, sources, labels=labels, task=task, threshold=threshold,
        threshold_method=threshold_info["description"] if threshold_info else "argmax (multiclass)",
        provenance=record, name=options.name or out.name, default_precision=default,
    )
    return BundleResult(out, manifest, members, threshold_info, metrics, time.perf_counter() - started, steps)


def _why_withheld(members: Sequence[ExportedMember], metrics: dict[str, Any], tolerance: Tolerance) -> str:
    """One sentence: which member (or the ensemble) missed the int8 tolerance, and by how much."""
    reasons = []
    for member in members:
        q = member.int8
        if q is None or q.chosen is None:
            reasons.append(f"{member.name}: no int8 model could be made")
        elif not q.ok:
            c = q.chosen
            reasons.append(f"{member.name}: best int8 max |dp| {c.max_prob_diff:.3f}, agreement {c.agreement:.3f}")
    check = metrics.get("int8_vs_fp32")
    if check and not tolerance.holds(check["max_prob_diff"], check["agreement"]):
        reasons.append(f"the int8 ensemble: max |dp| {check['max_prob_diff']:.3f}, agreement {check['agreement']:.3f}")
    limit = f"tolerance max |dp| <= {tolerance.max_prob_diff:g} and agreement >= {tolerance.min_agreement:g}"
    return f"{'; '.join(reasons) or 'missed the tolerance'} ({limit}); the bundle runs fp32"


def _record_int8_timing(record: dict[str, Any], members: Sequence[ExportedMember]) -> None:
    """Where and how fast int8 ran beside fp32 at export: the runtime's untuned precision rule
    trusts these timings on a CPU with the same int8 hardware (`runtime.tuning.export_timing`)
    instead of assuming int8 is slow wherever VNNI is missing."""
    record["machine"] = cpu_info().to_dict()
    entries = record.setdefault("members", {})
    for member in members:
        q = member.int8
        if q is None or q.chosen is None:
            continue
        entry = entries.setdefault(member.name, {}).setdefault("int8", {})
        entry["latency_ms"] = {"fp32": q.fp32_latency_ms, "int8": q.chosen.latency_ms}


def _threshold(
    task: str, text: Optional[str], validation: Optional[Validation], probs: Optional[np.ndarray], fallback: Optional[ThresholdFallback]
) -> Optional[dict[str, Any]]:
    """The binary threshold record {"threshold", "method", "description", ...}; None for multiclass."""
    if task != "binary":
        return None
    rule = thresholds.parse(text) if text is not None else None
    if rule is not None and validation is not None and probs is not None:
        return thresholds.choose(rule, validation.y, probs[:, 1]).as_dict()
    if rule is not None and rule.kind == "fixed":
        return {"threshold": rule.value, "method": rule.text, "description": f"fixed {rule.value:g} (declared)"}
    if fallback is None:
        raise ExportError(f"--threshold {rule.text if rule else ''} chooses on labelled data, and there is none here")
    return fallback(rule)


def _calibration(member: ExportedMember, options: Int8Options) -> np.ndarray:
    if options.calibration is not None:
        return load_tensors(image_files(options.calibration, limit=CALIBRATION_IMAGES), member.source.spec)
    if member.calibration is None:
        raise ExportError("--int8 needs --calibration DIR (real images, preprocessed with the declared spec)")
    return member.calibration()


def _quantize(
    member: ExportedMember, options: Int8Options, validation: Optional[Validation], threshold: Optional[float],
    work: Path, steps: dict[str, float], progress: Progress,
) -> MemberSource:
    """The member's int8 twin, accuracy-checked, with its heatmaps checked against fp32's."""
    from pneumoedge.export.heatmap_export import int8_heatmap_check
    from pneumoedge.export.int8_search import quantize_int8

    started = time.perf_counter()
    progress(f"quantizing {member.name} to int8 (calibration, recipe search if needed)")
    calib = _calibration(member, options)
    x_eval = validation.tensors_for(member.name) if validation is not None else None
    fp32 = member.source
    try:
        q = quantize_int8(
            fp32.onnx_path, work / f"{member.name}.int8.onnx", calib,
            eval_tensors=x_eval, y_true=validation.y if x_eval is not None else None, threshold=threshold,
            tolerance=options.tolerance, recipe=options.recipe, calibrate_method=options.calibrate_method,
            search=options.search, budget_s=options.budget_s, on_fail=options.on_fail,
        )
    except QuantizationError as exc:
        raise QuantizationError(f"{member.name}: {exc}") from None
    steps[f"int8 {member.name}"] = time.perf_counter() - started
    member.int8 = q
    c = q.chosen
    progress(
        f"  int8 recipe {c.recipe.name}: max diff {c.max_prob_diff:.4f}, agreement {c.agreement:.3f}, "
        f"{q.fp32_size_bytes / 1024:.0f} KB -> {c.size_bytes / 1024:.0f} KB, {q.fp32_latency_ms:.2f} -> {c.latency_ms:.2f} ms"
        + ("" if q.ok else "  [MISSES TOLERANCE]")
    )
    for warning in q.warnings:
        progress(f"  warning: {warning}")
    _keep_card(fp32.onnx_path, q.int8_path)
    explain = fp32.explain
    if explain:
        check = int8_heatmap_check(fp32.onnx_path, q.int8_path, x_eval if x_eval is not None else calib)
        explain = {**explain, "int8_check": check}
        progress(f"  int8 heatmaps vs fp32: min Pearson r {check['min_correlation']:.4f}; maps from the {check['heatmap_from']} graph")
    return MemberSource(q.int8_path, member.name, fp32.spec, "int8", fp32.weight, fp32.activation, explain, fp32.origin)


def _keep_card(fp32_path: Path, int8_path: Path) -> None:
    """Give the int8 file the fp32 file's card text when quantization rewrote it (a wrapped model's threshold)."""
    import onnx

    def card(path: Path) -> Optional[str]:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return props.get(ONNX_METADATA_KEY)

    wanted = card(fp32_path)
    if wanted is None or card(int8_path) == wanted:
        return
    proto = onnx.load(str(int8_path))
    props = {p.key: p.value for p in proto.metadata_props}
    props[ONNX_METADATA_KEY] = wanted
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(int8_path))


def _ensemble_check(
    validation: Validation, int8_sources: Sequence[MemberSource], p_fp32: np.ndarray, labels: Sequence[str],
    threshold: Optional[float], tolerance: Tolerance, metrics: dict[str, Any], progress: Progress,
) -> bool:
    """The int8 ensemble against the fp32 one on the validation data; False when it misses the tolerance."""
    p_int8 = validation.probabilities(int8_sources)
    metrics["validation_int8"] = classification_metrics(validation.y, p_int8, labels, threshold)
    check = {
        "max_prob_diff": float(np.abs(p_int8 - p_fp32).max()),
        "agreement": float((_decide(p_int8, threshold) == _decide(p_fp32, threshold)).mean()),
        "images": int(len(validation.y)),
    }
    metrics["int8_vs_fp32"] = check
    if not tolerance.holds(check["max_prob_diff"], check["agreement"]):
        progress(
            f"  warning: the int8 ensemble agrees with fp32 on {check['agreement']:.1%} of validation labels "
            f"(max diff {check['max_prob_diff']:.4f}); fp32 stays the default precision"
        )
        return False
    return True


def _decide(probs: np.ndarray, threshold: Optional[float]) -> np.ndarray:
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def _fit_ood(
    members: Sequence[ExportedMember], sources: list[MemberSource], work: Path, summary: dict[str, Any], progress: Progress
) -> list[MemberSource]:
    """Each member's sources (fp32 and int8) with statistics fitted on its reference images."""
    from pneumoedge.export.ood_fit import pick, with_ood

    fitted: dict[tuple[str, str], MemberSource] = {}
    for member in members:
        files = [Path(f) for f in member.references if Path(f).is_file()]
        if len(files) < MIN_REFERENCE_IMAGES:
            reason = f"only {len(files)} reference images found on disk" if files else "no --reference (or --calibration) folder given"
            summary[member.name] = {"available": False, "reason": reason}
            continue
        used = len(pick(files))
        described = member.references_described.format(used=used)
        progress(f"fitting {member.name}'s out-of-distribution statistics on {described}")
        own, summary[member.name] = with_ood([s for s in sources if s.name == member.name], files, work, described=described)
        for source in own:
            fitted[(source.name, source.precision)] = source
        for precision in ("fp32", "int8"):
            meta = summary[member.name].get(precision)
            if isinstance(meta, dict) and meta.get("threshold"):
                progress(f"  {precision}: threshold {meta['threshold']:.3g} (99th percentile of {meta['heldout_images']} held-out images), shrinkage {meta['shrinkage']:.3f}")
    return [fitted.get((s.name, s.precision), s) for s in sources]

