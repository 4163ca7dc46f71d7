"""Ensembles of ONNX members: decode once, a tensor per member, weighted average of probabilities."""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from pneumoedge.bundle import BundleError, Manifest
from pneumoedge.explain import Explanation
from pneumoedge.explain.maps import combine as combine_maps
from pneumoedge.explain.maps import original_size, work_grid
from pneumoedge.explain.overlay import to_display_gray
from pneumoedge.imageio import ImageError, ImageSource, read_bytes
from pneumoedge.preprocessing import read_for, to_tensor
from pneumoedge.runtime.map_sources import map_source_for
from pneumoedge.runtime.members import LoadedMember
from pneumoedge.runtime.ood import combine as ood_combine
from pneumoedge.runtime.ood import OodStats, manifest_entries, member_stats
from pneumoedge.runtime.prediction import Prediction
from pneumoedge.runtime.tuning import Configuration


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
        configuration: Optional[Configuration] = None,
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
        #: How this ensemble was configured here (precision, threads, batch) and why; None when
        #: built by hand rather than by `load`.
        self.configuration = configuration
        self._weights = np.array([m.weight for m in members], dtype=np.float64)
        self._weights /= self._weights.sum()
        self._decode_keys = sorted({m.card.spec.decode_key for m in members})
        self._explain_lock = threading.Lock()
        self._map_sources: dict[str, tuple[Optional[LoadedMember], str]] = {}
        #: Per member, its out-of-distribution statistics (None: the member has none).
        self.ood_stats: tuple[Optional[OodStats], ...] = tuple(member_stats(manifest, m) for m in self.members)

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
        return any(stats is not None for stats in self.ood_stats)

    @property
    def ood_note(self) -> str:
        """How out-of-distribution images are flagged, or why they cannot be."""
        fitted = [(m, e) for m, e in zip(self.members, manifest_entries(self.manifest, self.members)) if e]
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
        for member, batch, stats in zip(self.members, batches, self.ood_stats):
            source = self._map_source(member) if explain else None
            if source is member:
                p, heat, feats = member.run_outputs(batch, heatmap=True, features=stats is not None)
            else:
                p, _, feats = member.run_outputs(batch, features=stats is not None)
                heat = None if source is None else source.run_outputs(batch, heatmap=True)[1]
            probs.append(p)
            maps.append(heat)
            distances.append(None if stats is None else stats.distances(feats))
        fitted = [(d, s.threshold, w) for d, s, w in zip(distances, self.ood_stats, self._weights) if s is not None]
        count = len(batches[0])
        scores: list[Optional[float]] = [None] * count
        if fitted:
            scores = [ood_combine([d[i] for d, _, _ in fitted], [t for _, t, _ in fitted], [w for _, _, w in fitted]) for i in range(count)]
        return np.stack(probs), maps, scores

    def _map_source(self, member: LoadedMember) -> Optional[LoadedMember]:
        """The graph that gives `member`'s heatmap: itself, its fp32 sibling, or none."""
        with self._explain_lock:
            if member.name not in self._map_sources:
                self._map_sources[member.name] = map_source_for(member, self.manifest, self.threads)
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
                "members": {m.name: {k: v for k, v in e.items() if k != "path"} for m, e in zip(self.members, manifest_entries(self.manifest, self.members)) if e},
            },
        }


class _Prepared(NamedTuple):
    """One input ready to run: each member's tensor, and for explain (display pixels, original size)."""

    tensors: list
    view: Optional[tuple[np.ndarray, tuple[int, int]]]


def _spec_with_key(ensemble: Ensemble, key: tuple[int, bool]):
    return next(m.card.spec for m in ensemble.members if m.card.spec.decode_key == key)


def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "<array>" if isinstance(source, np.ndarray) else "<bytes>"

