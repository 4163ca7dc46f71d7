"""int8 by onnxruntime static quantization (QDQ or QOperator): the recipes and one quantization.

Steps: `quant_pre_process` (shape inference + graph optimisation), calibration on real images
through `preprocess` (a `CalibrationDataReader`), `quantize_static` (QDQ pairs, or QOperator
QLinearConv graphs for the "qop_" recipes). Calibration runs once per calibration method and
range symmetry: onnxruntime's own calibration cache (`calibration_cache_path`) serves every
later quantization of the same model, so a search of many node sets costs quantizations, not
calibrations. The comparison with fp32 and the search are in `int8_search` (which imports this
module, never the other way round). The final Sigmoid/Softmax always stays in float:
quantizing a probability to 256 steps would cost resolution exactly where the threshold lives.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from pneumoedge.bundle import ONNX_METADATA_KEY, ModelCard
from pneumoedge.int8_tolerance import Tolerance
from pneumoedge.export.onnx_run import onnx_session

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TYPES = ("uint8", "int8")
#: Ops quantized. Sigmoid/Softmax (the probability) stay in float on purpose.
OPS_TO_QUANTIZE = ("Conv", "MatMul", "Gemm", "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool")
#: The ops where int8 saves time (matrix products); the "compute_only" recipes quantize only these.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Recipe:
    """One way to quantize: activation/weight types, reduce_range, calibration, excluded nodes."""

    name: str
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    calibrate_method: str = "minmax"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    #: "qdq" (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels) or
    #: "qoperator" (QLinearConv & co. written directly into the graph).
    quant_format: str = "qdq"
    #: Symmetric activation ranges (onnxruntime's ActivationSymmetric + CalibTensorRangeSymmetric):
    #: zero points at the middle, which int8 activations want.
    symmetric_activations: bool = False
    #: Op types quantized (empty: OPS_TO_QUANTIZE). "Compute only" leaves Add/Mul/pools in float: the
    #: products of swish and squeeze-excitation gates (EfficientNet) lose most in 8 bits, and they cost little.
    op_types: tuple[str, ...] = ()

    @property
    def quantized_ops(self) -> tuple[str, ...]:
        return self.op_types or OPS_TO_QUANTIZE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude"] = list(self.exclude)
        data["op_types"] = list(self.op_types)
        return data


#: The registry of recipes, the default first. Names: activation+weight types, then options;
#: "qop_" recipes write QOperator (QLinearConv) graphs, the others QDQ.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("u8s8"),
        Recipe("u8s8_reduce_range", reduce_range=True),
        Recipe("u8s8_per_tensor", per_channel=False),
        Recipe("u8u8", weight_type="uint8"),
        Recipe("s8s8", activation_type="int8"),
        Recipe("qop_u8s8_reduce_range", reduce_range=True, quant_format="qoperator"),
        Recipe("qop_u8s8_per_tensor", per_channel=False, quant_format="qoperator"),
        Recipe("qop_u8u8_reduce_range", weight_type="uint8", reduce_range=True, quant_format="qoperator"),
        Recipe("u8s8_entropy", calibrate_method="entropy"),
        Recipe("u8s8_percentile", calibrate_method="percentile"),
        Recipe("u8u8_percentile", weight_type="uint8", calibrate_method="percentile"),
        Recipe("s8s8_symmetric", activation_type="int8", symmetric_activations=True),
        Recipe("u8s8_compute_only", op_types=COMPUTE_OPS),
    )
}
DEFAULT_RECIPE = "u8s8"
#: Recipes always tried beside the first one, because on x86 without VNNI (AVX2 only) they were
#: measured faster than QDQ u8s8 per-channel (QOperator's QLinearConv skips the QDQ fusion's
#: requantize steps) and 7-bit weights (reduce_range) or per-tensor scales avoid the u8s8
#: saturation that moved one model's probabilities by 0.17 (cnn3_gray150, per-channel u8s8).
#: The fastest candidate that meets the tolerance is kept (timed side by side: `time_models`).
SPEED_RECIPES = ("qop_u8s8_reduce_range", "qop_u8s8_per_tensor", "u8s8_reduce_range")


@dataclass(frozen=True)
class SearchBudget:
    """How much work the int8 search may do, counted in work so that its result does not depend on
    how busy the machine is: the same model, images and options give the same decisions.

    `time_limit_s` is an optional wall-clock cap on top: when it stops the search, the result says
    so in its warnings (and is then no longer reproducible on a slower machine).
    """

    #: Quantized candidates built and checked in all (recipes, effect ranking, fp32-set growth).
    trials: int = 48
    #: Of those, at most this many rank nodes by their effect on the output.
    rank_trials: int = 16
    #: Images the ranking trials run on (the first ones of the check images); the candidates that
    #: can be chosen are always checked on all of them.
    rank_images: int = 16
    #: The most nodes kept in fp32 (beyond this int8 is rarely faster than fp32).
    max_fp32_nodes: int = 16
    time_limit_s: Optional[float] = None

    def __post_init__(self) -> None:
        if min(self.trials, self.rank_trials, self.rank_images, self.max_fp32_nodes) < 0:
            raise ValueError(f"search budget figures must be >= 0: {self}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0 (or None for no cap), got {self.time_limit_s}")


@dataclass
class Candidate:
    """One recipe tried: its numbers, and whether it met the tolerance."""

    recipe: Recipe
    max_prob_diff: float
    mean_prob_diff: float
    agreement: float
    latency_ms: float
    size_bytes: int
    qdq_nodes: int
    meets: bool
    fp32_nodes: int = 0
    accuracy: Optional[float] = None
    roc_auc: Optional[float] = None
    path: Optional[Path] = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("recipe", "path")}
        data["recipe"] = self.recipe.to_dict()
        for key in ("max_prob_diff", "mean_prob_diff", "latency_ms"):  # JSON has no NaN/inf: not measured -> null
            if not np.isfinite(data[key]):
                data[key] = None
        return data


@dataclass
class QuantizationResult:
    """The chosen int8 model (if any) and everything tried."""

    int8_path: Optional[Path]
    chosen: Optional[Candidate]
    tried: list[Candidate]
    fp32_size_bytes: int
    fp32_latency_ms: float
    fp32_accuracy: Optional[float]
    fp32_roc_auc: Optional[float]
    images: int
    calibration_images: int
    tolerance: Tolerance
    seconds: float
    warnings: list[str] = field(default_factory=list)
    #: The fp32-kept-nodes search: [{fp32_nodes, max_prob_diff, agreement, latency_ms, meets}], fewest nodes first.
    curve: list[dict[str, Any]] = field(default_factory=list)
    #: Nodes ranked by their measured effect on the output probabilities: [{node, op_type, effect, ...}], largest first.
    ranking: list[dict[str, Any]] = field(default_factory=list)
    budget: SearchBudget = field(default_factory=SearchBudget)
    #: Candidates built and checked (counted against `budget.trials`).
    trials: int = 0

    @property
    def ok(self) -> bool:
        return self.chosen is not None and self.chosen.meets

    def to_dict(self) -> dict[str, Any]:
        return {
            "int8_path": str(self.int8_path) if self.int8_path else None,
            "ok": self.ok,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "tried": [c.to_dict() for c in self.tried],
            "fp32": {"size_bytes": self.fp32_size_bytes, "latency_ms": self.fp32_latency_ms, "accuracy": self.fp32_accuracy, "roc_auc": self.fp32_roc_auc},
            "images": self.images,
            "calibration_images": self.calibration_images,
            "tolerance": asdict(self.tolerance),
            "seconds": round(self.seconds, 2),
            "warnings": self.warnings,
            "curve": self.curve,
            "ranking": self.ranking,
            "budget": asdict(self.budget),
            "trials": self.trials,
        }


def _calibration_reader(tensors: np.ndarray, input_name: str, batch_size: int = 8) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class TensorReader(CalibrationDataReader):
        """Feeds preprocessed image tensors, `batch_size` at a time, then None."""

        def __init__(self) -> None:
            self._starts = iter(range(0, len(tensors), batch_size))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            start = next(self._starts, None)
            if start is None:
                return None
            return {input_name: np.ascontiguousarray(tensors[start : start + batch_size], dtype=np.float32)}

        def rewind(self) -> None:
            self._starts = iter(range(0, len(tensors), batch_size))

    return TensorReader()


@contextlib.contextmanager
def _working_folder(folder: str):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def preprocess_for_quantization(fp32_path: Union[str, Path], out_path: Union[str, Path]) -> Path:
    """onnxruntime's `quant_pre_process`: symbolic shape inference and graph optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    # When symbolic shape inference gives up, onnxruntime saves "sym_shape_infer_temp.onnx" and
    # a data file into the current folder: run it from a scratch folder, not the user's.
    with tempfile.TemporaryDirectory(prefix="pneumoedge-shapes-") as scratch, _working_folder(scratch):
        try:
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
        except Exception as exc:  # shape inference can fail on exotic graphs: fall back, but say so
            log.info("quant_pre_process with symbolic shapes failed (%s); retrying without", exc)
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def quantize_with(
    recipe: Recipe, pre_path: Path, out_path: Path, calibration: np.ndarray, card: ModelCard, *, cache: Optional[Path] = None
) -> Path:
    """Quantize `pre_path` with `recipe`, calibrating on `calibration`; keep the model card.

    `cache`: a folder for onnxruntime's calibration cache, one file per calibration method and
    range symmetry, so that later quantizations of the same model reuse the ranges.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    name = onnx_session(pre_path).get_inputs()[0].name
    extra: dict[str, Any] = {"CalibMovingAverage": False}
    if recipe.calibrate_method == "percentile":
        extra["CalibPercentile"] = 99.99
    if recipe.symmetric_activations:
        extra.update(ActivationSymmetric=True, CalibTensorRangeSymmetric=True)
    cache_file = None
    if cache is not None:
        # The calibrator collects the tensors of the op types quantized: one cache per set of them too.
        ops = "" if not recipe.op_types else "-" + "-".join(sorted(recipe.op_types)).lower()
        cache_file = Path(cache) / f"calibration-{recipe.calibrate_method}{'-symmetric' if recipe.symmetric_activations else ''}{ops}.json"
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress to stdout
        _quantize_static(
            str(pre_path),
            str(out_path),
            _calibration_reader(calibration, name),
            quant_format=QuantFormat.QOperator if recipe.quant_format == "qoperator" else QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.quantized_ops),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=types[recipe.activation_type],
            weight_type=types[recipe.weight_type],
            nodes_to_exclude=list(recipe.exclude) or None,
            calibrate_method=methods[recipe.calibrate_method],
            extra_options=extra,
            calibration_cache_path=cache_file,
        )
    model = onnx.load(str(out_path))
    props = {p.key: p.value for p in model.metadata_props}
    props[ONNX_METADATA_KEY] = json.dumps(card.to_dict())
    props["pneumoedge_quantization"] = json.dumps(recipe.to_dict())
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(out_path))
    return Path(out_path)


def quantizable_nodes(pre_path: Union[str, Path], op_types: tuple[str, ...] = OPS_TO_QUANTIZE) -> list[tuple[str, str]]:
    """(name, op type) of the nodes of `op_types` (those a recipe may quantize), in graph (topological) order."""
    import onnx

    return [(n.name, n.op_type) for n in onnx.load(str(pre_path)).graph.node if n.name and n.op_type in op_types]


def qdq_node_count(path: Union[str, Path]) -> int:
    """Number of QuantizeLinear + DequantizeLinear nodes (0 means nothing was quantized)."""
    import onnx

    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(path)).graph.node)
