"""Ensembles of ONNX members: decode once, a tensor per member, weighted average of probabilities."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import onnxruntime as ort

from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from pneumoedge.explain import Explanation
from pneumoedge.explain.maps import combine as combine_maps
from pneumoedge.explain.maps import original_size, work_grid
from pneumoedge.explain.overlay import to_display_gray
from pneumoedge.bundle import ONNX_METADATA_KEY, BundleError, Manifest, ModelCard, card_from_metadata, read_manifest, verify_file
from pneumoedge.imageio import ImageError, ImageSource, read_bytes
from pneumoedge.preprocessing import read_for, to_tensor
from pneumoedge.runtime.ood import OodError, OodStats
from pneumoedge.runtime.ood import combine as ood_combine
from pneumoedge.runtime.sessions import commit_optimized, create_session
from pneumoedge.runtime.tuning import file_stat, optimized_graph_file, remember_verified, resolve, rule, verified_before

ModelRef = Union[str, Path]
_ORT_LOAD_ERRORS = (_ort_state.InvalidProtobuf, _ort_state.Fail, _ort_state.InvalidGraph, _ort_state.NoSuchFile, _ort_state.InvalidArgument)


@dataclass(frozen=True)
class Prediction:
    """One input's result. Decision support for clinicians, never a diagnosis.

    `probability` is that of `label`; `probabilities` has every label's. For a binary task the
    label is the positive one when its probability reaches `threshold`. `disagreement` is the
    largest spread (max - min) of any label's probability across members (0 for one member).
    """

    source: str
    status: str  # "ok" or "error"
    label: Optional[str] = None
    probability: Optional[float] = None
    probabilities: dict[str, float] = field(default_factory=dict)
    member_probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    disagreement: Optional[float] = None
    threshold: Optional[float] = None
    provider: Optional[str] = None
    error: str = ""
    #: Out-of-distribution flag and score (None: the model carries no statistics to judge).
    ood: Optional[bool] = None
    ood_score: Optional[float] = None
    #: Where the heatmap overlay of this image was written ("" when none was asked for).
    overlay_path: str = ""
    #: The heatmap, when predicted with `explain=True` (see `pneumoedge.explain`).
    explanation: Optional[Any] = field(default=None, repr=False, compare=False)

    @property
    def heatmap(self) -> Optional[np.ndarray]:
        """float32 (height, width) of the original image, 0..1; None unless predicted with explain=True."""
        return None if self.explanation is None else self.explanation.heatmap

    def overlay(self, max_side: int = 1024) -> np.ndarray:
        """uint8 RGB: the X-ray with the heatmap, a legend, the result and the decision-support notice.

        Raises ValueError when this prediction has no heatmap (see `Ensemble.explain_note`).
        """
        if self.explanation is None:
            raise ValueError(f"{self.source}: no heatmap (predict with explain=True, on a model whose graphs carry heatmaps)")
        return self.explanation.overlay(max_side)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "status": self.status,
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "member_probabilities": self.member_probabilities,
            "disagreement": self.disagreement,
            "threshold": self.threshold,
            "provider": self.provider,
            "ood": self.ood,
            "ood_score": self.ood_score,
            "overlay": self.overlay_path,
            "error": self.error,
        }


@dataclass(frozen=True)
class LoadedMember:
    """A member with its open session."""

    name: str
    weight: float
    card: ModelCard
    session: ort.InferenceSession
    source: str
    precision: str = "fp32"

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.session.get_inputs()[0].shape[0], int)

    @property
    def output_name(self) -> str:
        return self.session.get_outputs()[0].name

    @property
    def heatmap_output(self) -> Optional[str]:
        """The graph's heatmap output, when its card names one that exists."""
        name = (self.card.explain or {}).get("heatmap_output")
        return name if name and name in {o.name for o in self.session.get_outputs()} else None

    @property
    def features_output(self) -> Optional[str]:
        """The graph's pooled-features output (what the out-of-distribution score reads), if any."""
        name = (self.card.explain or {}).get("features_output")
        return name if name and name in {o.name for o in self.session.get_outputs()} else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch of tensors; return (N, K) probabilities (activation applied)."""
        return self.run_outputs(batch)[0]

    def run_explained(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) probabilities and (N, h, w) raw heatmaps, from one run of the graph."""
        probs, maps, _ = self.run_outputs(batch, heatmap=True)
        return probs, maps  # type: ignore[return-value]

    def run_outputs(
        self, batch: np.ndarray, *, heatmap: bool = False, features: bool = False
    ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """One run: (N, K) probabilities, and when asked (N, h, w) raw heatmaps and (N, C) features."""
        names = [self.output_name] + ([self.heatmap_output] if heatmap else []) + ([self.features_output] if features else [])
        outputs = self._run(names, batch)
        probs = self._probabilities(outputs[0], len(batch))
        maps = np.asarray(outputs[1], dtype=np.float32) if heatmap else None
        feats = np.asarray(outputs[-1]).reshape(len(batch), -1) if features else None
        return probs, maps, feats

    def _run(self, names: list, batch: np.ndarray) -> list:
        # Only the named outputs are copied out: plain runs never fetch the heatmaps.
        if self.dynamic_batch:
            return self.session.run(names, {self.input_name: batch})
        parts = [self.session.run(names, {self.input_name: batch[i : i + 1]}) for i in range(len(batch))]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(names))]

    def _probabilities(self, raw: np.ndarray, count: int) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float64).reshape(count, -1)
        if self.card.activation == "sigmoid":
            raw = 1.0 / (1.0 + np.exp(-raw))
        elif self.card.activation == "softmax":
            shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
            raw = shifted / shifted.sum(axis=1, keepdims=True)
        if self.card.task == "binary" and raw.shape[1] == 1:
            raw = np.concatenate([1.0 - raw, raw], axis=1)
        if raw.shape[1] != len(self.card.labels):
            raise BundleError(
                f"{self.source}: model outputs {raw.shape[1]} values per image but has "
                f"{len(self.card.labels)} labels {list(self.card.labels)}"
            )
        return raw


def _check_input_shape(member: LoadedMember) -> None:
    node = member.session.get_inputs()[0]
    expected = member.card.spec.input_shape
    shape = list(node.shape)
    if len(member.session.get_inputs()) != 1:
        raise BundleError(f"{member.source}: model has {len(member.session.get_inputs())} inputs; one image input expected")
    if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected)):
        raise BundleError(
            f"{member.source}: ONNX input {node.name!r} has shape {shape}, which does not fit its spec "
            f"({member.card.spec.layout} {list(expected)} plus a batch axis)"
        )
    if node.type != "tensor(float)":
        raise BundleError(f"{member.source}: ONNX input {node.name!r} is {node.type}; float32 expected")


class Ensemble:
    """Loaded models ready to predict. Safe to share between threads (sessions are)."""

    def __init__(
        self,
        members: Sequence[LoadedMember],
        *,
        threshold: Optional[float],
        threshold_method: str = "unspecified",
        manifest: Optional[Manifest] = None,
        threads: Optional[int] = None,
    ) -> None:
        if not members:
            raise BundleError("an ensemble needs at least one member")
        first = members[0].card
        for member in members[1:]:
            if member.card.labels != first.labels or member.card.task != first.task:
                raise BundleError(
                    f"{member.source}: labels {list(member.card.labels)} ({member.card.task}) differ from "
                    f"{members[0].source}: {list(first.labels)} ({first.task}); members must share labels"
                )
        if first.task == "binary" and (threshold is None or not 0.0 <= threshold <= 1.0):
            raise BundleError(f"a binary ensemble needs a threshold between 0 and 1, got {threshold!r}")
        self.members = tuple(members)
        self.labels = first.labels
        self.task = first.task
        self.threshold = threshold if first.task == "binary" else None
        self.threshold_method = threshold_method
        self.manifest = manifest
        #: onnxruntime intra-op threads per session (None: one per core), as loaded.
        self.threads = threads
        self._weights = np.array([m.weight for m in members], dtype=np.float64)
        self._weights /= self._weights.sum()
        self._decode_keys = sorted({m.card.spec.decode_key for m in members})
        self._explain_lock = threading.Lock()
        self._map_sources: dict[str, tuple[Optional[LoadedMember], str]] = {}
        self._ood = [_ood_stats(manifest, m) for m in self.members]

    @property
    def provider(self) -> str:
        providers = sorted({m.provider for m in self.members})
        return "+".join(providers)

    def decode(self, source: ImageSource) -> dict[tuple[int, bool], np.ndarray]:
        """Decode a source once per distinct decode mode the members need (usually once)."""
        if len(self._decode_keys) > 1 and isinstance(source, (str, Path)):
            source = read_bytes(source)  # one read from disk, however many decode modes
        return {key: read_for(source, _spec_with_key(self, key)) for key in self._decode_keys}

    def tensors(self, decoded: dict[tuple[int, bool], np.ndarray]) -> list[np.ndarray]:
        """Each member's input tensor from the shared decoded pixels."""
        return [to_tensor(decoded[m.card.spec.decode_key], m.card.spec) for m in self.members]

    def run_tensors(self, per_member: Sequence[np.ndarray]) -> np.ndarray:
        """Run every member on its (N, ...) batch; return (members, N, labels) probabilities."""
        return np.stack([m.run(batch) for m, batch in zip(self.members, per_member)])

    def combine(self, source: str, member_probs: np.ndarray, ood_score: Optional[float] = None) -> Prediction:
        """Build a Prediction from one input's (members, labels) probabilities (and OOD score)."""
        mean = np.tensordot(self._weights, member_probs, axes=1)
        if self.task == "binary":
            index = 1 if mean[1] >= self.threshold else 0
        else:
            index = int(np.argmax(mean))
        spread = float((member_probs.max(axis=0) - member_probs.min(axis=0)).max())
        return Prediction(
            source=source,
            status="ok",
            label=self.labels[index],
            probability=float(mean[index]),
            probabilities={label: float(p) for label, p in zip(self.labels, mean)},
            member_probabilities={
                m.name: {label: float(p) for label, p in zip(self.labels, probs)}
                for m, probs in zip(self.members, member_probs)
            },
            disagreement=spread,
            threshold=self.threshold,
            provider=self.provider,
            ood=None if ood_score is None else bool(ood_score >= 1.0),
            ood_score=ood_score,
        )

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest is not None else "+".join(m.name for m in self.members)

    @property
    def can_explain(self) -> bool:
        """Whether `predict(..., explain=True)` gives heatmaps (some member's graph carries them)."""
        return any(m.heatmap_output is not None for m in self.members)

    @property
    def explain_note(self) -> str:
        """Why heatmaps are missing, for all or some members ("" when every member has them)."""
        missing = [m.name for m in self.members if m.heatmap_output is None]
        if not missing:
            return ""
        if len(missing) == len(self.members):
            return ("heatmaps not available for this model: its ONNX graphs carry no heatmap output "
                    "(export with pneumoedge's heatmaps, from a Keras model whose head allows them)")
        return f"heatmaps come from {len(self.members) - len(missing)} of {len(self.members)} members; without: {', '.join(missing)}"

    @property
    def can_flag_ood(self) -> bool:
        """Whether predictions carry `ood` / `ood_score` (some member has reference statistics)."""
        return any(stats is not None for stats in self._ood)

    @property
    def ood_note(self) -> str:
        """How out-of-distribution images are flagged, or why they cannot be."""
        fitted = [(m, e) for m, e in zip(self.members, _ood_entries(self.manifest, self.members)) if e]
        if not fitted:
            return "cannot flag out-of-distribution images: this model carries no reference statistics (ood columns stay empty)"
        counts = ", ".join(f"{m.name}: {e.get('reference_images', '?')} images" for m, e in fitted)
        return f"flags images unlike its training images (Mahalanobis distance of features; statistics from {counts})"

    def predict(self, source: ImageSource, *, explain: bool = False) -> Prediction:
        """Predict one image (path, encoded bytes, or a uint8/uint16 pixel array).

        With `explain`, the prediction also carries the heatmap (`Prediction.heatmap`,
        `Prediction.overlay()`) when the model can give one (`can_explain`).
        Raises `ImageError` when the input cannot be read.
        """
        return self._finish([(_name_of(source), self._prepare(source, explain))], explain)[0]

    def predict_many(
        self,
        sources: Iterable[ImageSource],
        *,
        batch_size: int = 8,
        workers: Optional[int] = None,
        runners: Optional[int] = None,
        explain: bool = False,
        postprocess: Optional[Callable[[Prediction], Prediction]] = None,
    ) -> Iterator[Prediction]:
        """Predict a stream of inputs in order, one Prediction each; unreadable ones get status "error".

        Decoding and preprocessing run in a pool of `workers` threads (OpenCV releases the GIL)
        ahead of the model runs; batches of `batch_size` run on the models in `runners` threads
        at once (onnxruntime releases the GIL too). At most `(runners + 2) * batch_size` inputs
        are in flight, so memory stays flat on any folder size.

        `runners` defaults to one per core divided by the sessions' intra-op threads: with
        `threads=1`, each core runs its own batch, which beat one batch on all cores by 10-35%
        for folders on a 2-core CPU (benchmarks/RESULTS.md); with the default threads, one.
        `explain` adds heatmaps; `postprocess` (e.g. writing an overlay) runs on each ok
        prediction in the runner threads, so it overlaps the other batches' work.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        cores = os.cpu_count() or 1
        workers = workers or min(8, cores)
        runners = runners or (1 if self.threads is None else max(1, cores // self.threads))
        iterator = iter(sources)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pneumoedge-decode") as decode, \
                ThreadPoolExecutor(max_workers=runners, thread_name_prefix="pneumoedge-run") as run:
            chunks: deque[Future] = deque()

            def refill() -> None:
                while len(chunks) < runners + 1:
                    chunk = [(_name_of(s), decode.submit(self._prepare, s, explain)) for s in itertools.islice(iterator, batch_size)]
                    if not chunk:
                        return
                    chunks.append(run.submit(self._run_chunk, chunk, explain, postprocess))

            refill()
            while chunks:
                done = chunks.popleft()
                refill()  # keep decoders and runners busy while this batch is handed out
                yield from done.result()

    def _prepare(self, source: ImageSource, explain: bool = False) -> "_Prepared":
        if not explain:
            return _Prepared(self.tensors(self.decode(source)), None)
        data = read_bytes(source) if isinstance(source, (str, Path)) else source
        decoded = self.decode(data)
        key = max(decoded, key=lambda k: decoded[k].size)  # the finest decode is what the overlay shows
        size = original_size(data if isinstance(data, bytes) else None, decoded[key], key[0])
        return _Prepared(self.tensors(decoded), (to_display_gray(decoded[key]), size))

    def _run_chunk(
        self, chunk: list[tuple[str, Future]], explain: bool = False, postprocess: Optional[Callable[[Prediction], Prediction]] = None
    ) -> list[Prediction]:
        ready: list[tuple[int, tuple[str, _Prepared]]] = []
        results: list[Optional[Prediction]] = [None] * len(chunk)
        for index, (name, future) in enumerate(chunk):
            try:
                ready.append((index, (name, future.result())))
            except ImageError as exc:
                results[index] = Prediction(source=name, status="error", error=str(exc))
        if ready:
            for (index, _), prediction in zip(ready, self._finish([item for _, item in ready], explain)):
                results[index] = postprocess(prediction) if postprocess is not None else prediction
        return results  # type: ignore[return-value]

    def _finish(self, items: list[tuple[str, "_Prepared"]], explain: bool) -> list[Prediction]:
        """Run the members on prepared inputs and combine each input's results."""
        batches = [np.stack([prepared.tensors[k] for _, prepared in items]) for k in range(len(self.members))]
        probs, maps, scores = self._run_members(batches, explain)
        predictions = [self.combine(name, probs[:, i], scores[i]) for i, (name, _) in enumerate(items)]
        if not explain:
            return predictions
        return [
            self._explained(prediction, [None if m is None else m[i] for m in maps], prepared.view)
            for i, (prediction, (_, prepared)) in enumerate(zip(predictions, items))
        ]

    def _run_members(self, batches: Sequence[np.ndarray], explain: bool) -> tuple[np.ndarray, list, list[Optional[float]]]:
        """(members, N, labels) probabilities, each member's maps (explain) and each input's OOD score."""
        probs, maps, distances = [], [], []
        for member, batch, stats in zip(self.members, batches, self._ood):
            source = self._map_source(member) if explain else None
            if source is member:
                p, heat, feats = member.run_outputs(batch, heatmap=True, features=stats is not None)
            else:
                p, _, feats = member.run_outputs(batch, features=stats is not None)
                heat = None if source is None else source.run_outputs(batch, heatmap=True)[1]
            probs.append(p)
            maps.append(heat)
            distances.append(None if stats is None else stats.distances(feats))
        fitted = [(d, s.threshold, w) for d, s, w in zip(distances, self._ood, self._weights) if s is not None]
        count = len(batches[0])
        scores: list[Optional[float]] = [None] * count
        if fitted:
            scores = [ood_combine([d[i] for d, _, _ in fitted], [t for _, t, _ in fitted], [w for _, _, w in fitted]) for i in range(count)]
        return np.stack(probs), maps, scores

    def _map_source(self, member: LoadedMember) -> Optional[LoadedMember]:
        """The graph that gives `member`'s heatmap: itself, its fp32 sibling, or none."""
        with self._explain_lock:
            if member.name not in self._map_sources:
                self._map_sources[member.name] = _map_source_for(self, member)
            return self._map_sources[member.name][0]

    def map_sources(self) -> dict[str, str]:
        """Per member, which graph its heatmap comes from (after the first explained prediction)."""
        for member in self.members:
            self._map_source(member)
        return {name: how for name, (_, how) in self._map_sources.items()}

    def _explained(self, prediction: Prediction, cams: Sequence[Optional[np.ndarray]], view: Any) -> Prediction:
        usable = [(m, cam, w) for m, cam, w in zip(self.members, cams, self._weights) if cam is not None]
        if not usable or view is None:
            return prediction
        display, size = view
        grid_map = combine_maps(
            [cam for _, cam, _ in usable], [(m.card.spec.height, m.card.spec.width) for m, _, _ in usable],
            [float(w) for _, _, w in usable], work_grid(size),
        )
        score = str((usable[0][0].card.explain or {}).get("score", "explained score"))
        line = f"{prediction.label}: p = {prediction.probability:.3f}"
        if self.threshold is not None:
            line += f" (threshold {self.threshold:.3f})"
        members = f"{len(self.members)} member" + ("s" if len(self.members) != 1 else "")
        caption = (line, f"Model: {self.name} ({members}). Colour: what raised the {score}.")
        explanation = Explanation(grid_map, size, display, self.map_sources(), score, caption, ood=prediction.ood)
        return replace(prediction, explanation=explanation)

    def describe(self) -> dict[str, Any]:
        """What this ensemble is: members, specs, labels, threshold, providers."""
        return {
            "task": self.task,
            "labels": list(self.labels),
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "members": [
                {
                    "name": m.name,
                    "source": m.source,
                    "weight": m.weight,
                    "precision": m.precision,
                    "activation": m.card.activation,
                    "provider": m.provider,
                    "spec": m.card.spec.to_dict(),
                    "heatmap_layer": (m.card.explain or {}).get("layer") if m.heatmap_output else None,
                }
                for m in self.members
            ],
            "heatmaps": {
                "available": self.can_explain,
                "score": next((str(m.card.explain.get("score")) for m in self.members if m.heatmap_output and m.card.explain), None),
                "note": self.explain_note,
            },
            "out_of_distribution": {
                "available": self.can_flag_ood,
                "note": self.ood_note,
                "members": {m.name: {k: v for k, v in e.items() if k != "path"} for m, e in zip(self.members, _ood_entries(self.manifest, self.members)) if e},
            },
        }


class _Prepared(NamedTuple):
    """One input ready to run: each member's tensor, and for explain (display pixels, original size)."""

    tensors: list
    view: Optional[tuple[np.ndarray, tuple[int, int]]]


def _ood_entries(manifest: Optional[Manifest], members: Sequence[LoadedMember]) -> list[Optional[dict]]:
    if manifest is None:
        return [None] * len(members)
    entries = {(e.name, e.precision): e.ood for e in manifest.members}
    return [entries.get((m.name, m.precision)) for m in members]


def _ood_stats(manifest: Optional[Manifest], member: LoadedMember) -> Optional[OodStats]:
    """A bundle member's out-of-distribution statistics, checksummed and read (None without)."""
    entry = _ood_entries(manifest, [member])[0]
    if not entry:
        return None
    if member.features_output is None:
        raise BundleError(f"{member.source}: has out-of-distribution statistics but its graph gives no features output")
    verify_file(entry["path"], entry["sha256"])
    try:
        return OodStats.load(entry["path"])
    except OodError as exc:
        raise BundleError(str(exc)) from None


def _map_source_for(ensemble: Ensemble, member: LoadedMember) -> tuple[Optional[LoadedMember], str]:
    """An int8 member whose maps did not correlate with fp32's at export gets its fp32 sibling's maps."""
    if member.heatmap_output is None:
        return None, "no heatmap output"
    if member.precision != "int8":
        return member, f"{member.precision} graph"
    check = (member.card.explain or {}).get("int8_check") or {}
    if check.get("heatmap_from") == "int8":
        return member, f"int8 graph (r >= {check.get('min_correlation', 0):.3f} vs fp32 at export)"
    sibling = None
    if ensemble.manifest is not None:
        sibling = next((e for e in ensemble.manifest.members if e.name == member.name and e.precision == "fp32"), None)
    if sibling is None:
        return member, "int8 graph (not checked against fp32)"
    device = "cuda" if member.provider == "CUDAExecutionProvider" else "cpu"
    session = _open(sibling.path, device, ensemble.threads)
    fp32 = LoadedMember(sibling.name, sibling.weight, sibling.card, session, str(sibling.path), "fp32")
    why = f"r = {check['min_correlation']:.3f} vs fp32 at export" if "min_correlation" in check else "not checked at export"
    return fp32, f"fp32 graph (int8 maps: {why})"


def _spec_with_key(ensemble: Ensemble, key: tuple[int, bool]):
    return next(m.card.spec for m in ensemble.members if m.card.spec.decode_key == key)


def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "<array>" if isinstance(source, np.ndarray) else "<bytes>"


def default_bundle_path() -> Path:
    """The bundled default model: inside the installed wheel, or models/ in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "models" / "default", package.parent / "models" / "default"):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise BundleError("no default bundle found (models/default is missing from this install); pass --model")


def load(
    model: Union[ModelRef, Sequence[ModelRef], None] = None,
    *,
    device: str = "cpu",
    precision: str = "auto",
    threads: Union[int, None, str] = None,
) -> Ensemble:
    """Load a bundle folder, or one or more self-describing `.onnx` files, ready to predict.

    Args:
        model: a bundle folder; an `.onnx` path; a list of `.onnx` paths (an ad-hoc ensemble,
            equal weights); or None for the bundled default model.
        device: "cpu", "cuda" (fails clearly when CUDA cannot run) or "auto".
        precision: for bundles: "auto" (this computer's choice: what `pneumoedge tune` measured,
            else int8 only where it passed its accuracy check and the CPU has VNNI/AMX),
            "default" (the manifest's choice), "fp32" or "int8".
        threads: onnxruntime intra-op threads per session (None: its default, every core);
            "auto": this computer's choice for folders (see `pneumoedge.runtime.tuning`).

    The configuration in use and where it came from is `ensemble.configuration`.
    """
    refs = [default_bundle_path()] if model is None else [model] if isinstance(model, (str, Path)) else list(model)
    if not refs:
        raise BundleError("no model given")
    paths = [Path(r) for r in refs]
    if any(p.is_dir() for p in paths):
        if len(paths) != 1:
            raise BundleError("give one bundle folder, or one or more .onnx files, not a mix")
        return _load_bundle(paths[0], device, precision, threads)
    config = rule(None, model_bytes=max(p.stat().st_size if p.is_file() else 0 for p in paths))
    if threads != "auto":
        config = replace(config, threads=threads, source="user", reason="threads as given")
    members = [_load_onnx(p, device, config.threads) for p in paths]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        members = [_renamed(m, f"{m.name}_{i}") for i, m in enumerate(members)]
    found = {_metadata_threshold(m.session) for m in members}
    if len(found) == 1 and None not in found:
        threshold, method = found.pop(), "from the models' metadata"
    else:
        threshold, method = 0.5, "default 0.5 (the ONNX files carry no shared threshold)"
    ensemble = Ensemble(members, threshold=threshold, threshold_method=method, threads=config.threads)
    ensemble.configuration = config
    return ensemble


def _renamed(member: LoadedMember, name: str) -> LoadedMember:
    return LoadedMember(name, member.weight, member.card, member.session, member.source, member.precision)


def _metadata_threshold(session: ort.InferenceSession) -> Optional[float]:
    text = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY, "{}")
    value = json.loads(text).get("threshold")
    return float(value) if isinstance(value, (int, float)) else None


def _open(path: Path, device: str, threads: Optional[int]) -> ort.InferenceSession:
    try:
        return create_session(path, device, threads)
    except _ORT_LOAD_ERRORS as exc:
        raise BundleError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None


def _load_onnx(path: Path, device: str, threads: Optional[int]) -> LoadedMember:
    if not path.is_file():
        raise BundleError(f"{path}: no such model file or bundle folder")
    session = _open(path, device, threads)
    card = card_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    member = LoadedMember(path.stem, 1.0, card, session, str(path))
    _check_input_shape(member)
    return member


def _load_bundle(root: Path, device: str, precision: str, threads: Union[int, None, str]) -> Ensemble:
    manifest = read_manifest(root, verify=False)  # checksums below: only the members loaded
    try:
        config = resolve(manifest, precision=precision, threads=threads, device=device)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    members = []
    for entry in manifest.members_for(config.precision):
        session = _open_verified(entry, device, config.threads)
        member = LoadedMember(entry.name, entry.weight, entry.card, session, str(entry.path), entry.precision)
        _check_input_shape(member)
        members.append(member)
    ensemble = Ensemble(
        members, threshold=manifest.threshold, threshold_method=manifest.threshold_method, manifest=manifest, threads=config.threads
    )
    ensemble.configuration = config
    return ensemble


def _open_verified(entry: Any, device: str, threads: Optional[int]) -> ort.InferenceSession:
    """Open a member from one read of its file, hashing those bytes while the session is built.

    A big member (an 80 MB Xception) costs ~0.2 s to hash: in a thread beside session creation
    (both release the GIL) that time is hidden, and the file is read once, not twice. A big
    member whose very file (inode, size, mtime, ctime) hashed right before is not hashed again,
    and its optimized graph comes from the cache (docs/speed.md).
    """
    size = os.path.getsize(entry.path)
    optimized = optimized_graph_file(entry.sha256, size, device)
    if optimized is not None and optimized.is_file() and verified_before(entry.path, entry.sha256):
        session = _open_bytes(entry.path, str(entry.path), device, threads, optimized)
        commit_optimized(optimized, verified=True)  # a damaged cache file was rebuilt from the trusted file
        return session
    stat_before = file_stat(entry.path)
    try:
        data = Path(entry.path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{entry.path}: cannot read member file: {exc.strerror or exc}") from None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumoedge-sha256") as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            session: Optional[ort.InferenceSession] = _open_bytes(entry.path, data, device, threads, optimized)
            failure = None
        except BundleError as exc:  # a changed file is reported as changed, not as unloadable
            session, failure = None, exc
        actual = digest.result()
    if optimized is not None:
        commit_optimized(optimized, verified=actual == entry.sha256 and failure is None)
    if actual == entry.sha256 and failure is not None:
        raise failure
    if optimized is not None and actual == entry.sha256:
        remember_verified(entry.path, actual, stat_before)
    if actual != entry.sha256:
        raise BundleError(
            f"{entry.path}: checksum mismatch (manifest sha256 {entry.sha256[:12]}…, file {actual[:12]}…); "
            "the file was changed or corrupted after the bundle was made"
        )
    return session


def _open_bytes(
    path: Path, data: Union[bytes, str], device: str, threads: Optional[int], optimized: Optional[Path] = None
) -> ort.InferenceSession:
    try:
        return create_session(data, device, threads, optimized_cache=optimized)
    except _ORT_LOAD_ERRORS as exc:
        raise BundleError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
