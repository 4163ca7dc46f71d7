"""Out-of-distribution score: how far an image's features lie from the model's training images.

Each member's graph gives the global average of its feature layer (the layer the heatmaps
explain) beside its probabilities, from the same run. At export, those features are collected
on reference images (the training images), and this module fits their mean and a shrunk
covariance (Ledoit-Wolf shrinkage towards a scaled identity: the features are wide and the
reference sets small, so the plain sample covariance would be singular or unstable), keeping
a fifth of the images out to set the threshold at their 99th percentile of Mahalanobis
distance (Lee et al. 2018). At run time the same function scores every image.

An ensemble combines its members' evidence as the weighted mean (ensemble weights) of each
member's distance divided by that member's threshold: `ood_score` 1.0 is the flag's
threshold, 2.0 twice as far as the held-out training images at their 99th percentile.
A distance in feature space is evidence, not a guarantee: an image can resemble the training
data in these features and still be unlike it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np
from threadpoolctl import ThreadpoolController

from pneumoedge.bundle import BundleError, Manifest, check_digest
from pneumoedge.runtime.machine import OPTIMIZED_GRAPH_MIN_BYTES, file_stat, remember_verified, verified_before

if TYPE_CHECKING:
    from pneumoedge.runtime.members import LoadedMember

METHOD = "Mahalanobis distance of pooled feature-layer activations, Ledoit-Wolf shrunk covariance (Lee et al. 2018)"
DEFAULT_PERCENTILE = 99.0
HELDOUT_FRACTION = 0.2


class OodError(ValueError):
    """Statistics that cannot be fitted or read."""


@dataclass(frozen=True)
class OodStats:
    """One member's reference statistics: features' mean, inverse shrunk covariance, threshold."""

    mean: np.ndarray  # (C,) float64
    precision: np.ndarray  # (C, C) float64, inverse of the shrunk covariance
    threshold: float  # distance at the held-out reference images' percentile

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `features` (N, C): the run-time scoring function.

        The squared distance xᵀ·P·x is (x·P)·x: a float32 vector-matrix product per image on one
        BLAS thread, instead of a three-operand float64 einsum over C x C, which runs without
        BLAS (23 ms per image at C = 2048; this: ~0.4-0.8 ms). Row by row, not one product per
        batch: an image's score must not depend on which images share its batch (a batched
        product differed in the 8th digit), so `infer`, `serve` and the Ray engine agree exactly.
        No factorisation at load: a Cholesky of a 2048-wide precision costs 0.5 s of a process's
        start. The result equals `exact_distances` to about 1e-5 relative (a test holds it).
        """
        centred = np.asarray(features, dtype=np.float32).reshape(len(features), -1) - self._mean32
        squared = np.empty(len(centred), dtype=np.float64)
        with _single_threaded_blas():
            for i, row in enumerate(centred):
                squared[i] = np.dot((row @ self._precision32).astype(np.float64), row.astype(np.float64))
        return np.sqrt(np.maximum(squared, 0.0))

    def exact_distances(self, features: np.ndarray) -> np.ndarray:
        """The same distances in float64 straight from the precision matrix. Export fits its
        threshold with these, so a rebuilt bundle's statistics are identical bit for bit."""
        centred = np.asarray(features, dtype=np.float64).reshape(len(features), -1) - self.mean
        squared = np.einsum("nc,cd,nd->n", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    @cached_property
    def _mean32(self) -> np.ndarray:
        return self.mean.astype(np.float32)

    @cached_property
    def _precision32(self) -> np.ndarray:
        return np.ascontiguousarray(self.precision, dtype=np.float32)

    def save(self, path: Union[str, Path]) -> Path:
        with open(path, "wb") as handle:
            np.savez(handle, mean=self.mean, precision=self.precision, threshold=np.float64(self.threshold))
        return Path(path)

    @classmethod
    def load(cls, source: Union[str, Path, io.BytesIO], where: Optional[str] = None) -> "OodStats":
        """Read statistics from a `.ood.npz` file (or its bytes in a BytesIO, named by `where`)."""
        path = where or source
        try:
            with np.load(source, allow_pickle=False) as data:
                mean = np.asarray(data["mean"], dtype=np.float64)
                precision = np.asarray(data["precision"], dtype=np.float64)
                threshold = float(data["threshold"])
        except (OSError, KeyError, ValueError) as exc:
            raise OodError(f"{path}: unreadable out-of-distribution statistics ({exc})") from None
        if mean.ndim != 1 or precision.shape != (mean.shape[0], mean.shape[0]) or not threshold > 0:
            raise OodError(f"{path}: out-of-distribution statistics have inconsistent shapes {mean.shape}, {precision.shape}")
        stats = cls(mean, precision, threshold)
        stats._mean32, stats._precision32  # converted once at load, not in the first batch's runner threads
        return stats


_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS on the calling thread only, for one product.

    The callers already run one batch per core (`predict_many`'s runners) beside onnxruntime's
    threads: BLAS's own threads can only contend with them. On a shared 2-core machine, OpenBLAS's
    two threads waiting on each other made an 8 x 2048 x 2048 product take 91 ms instead of 5 ms
    single-threaded. The limit is process-wide while it holds, hence the lock (products are short).
    """
    with _BLAS_LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        yield


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """Ledoit-Wolf (2004) shrinkage intensity towards (trace / C) * I, for centred samples (n, C)."""
    n, p = centred.shape
    x2 = centred**2
    trace_per_feature = x2.sum(axis=0) / n
    mu = trace_per_feature.sum() / p
    beta_sum = float(np.sum(x2.T @ x2))
    delta_sum = float(np.sum((centred.T @ centred) ** 2)) / n**2
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2.0 * mu * trace_per_feature.sum() + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else float(beta / delta)


def fit(
    features: np.ndarray, *, percentile: float = DEFAULT_PERCENTILE, heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0
) -> tuple[OodStats, dict[str, Any]]:
    """Fit statistics on reference features (N, C); the threshold comes from a held-out part.

    Returns the statistics and what `info` should say about them (counts, shrinkage, threshold).
    """
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    n, width = features.shape
    if n < 10:
        raise OodError(f"out-of-distribution statistics need at least 10 reference images, got {n}")
    if not np.all(np.isfinite(features)):
        raise OodError("reference features contain NaN or infinite values")
    order = np.random.default_rng(seed).permutation(n)
    held = max(2, int(round(n * heldout_fraction)))
    fit_rows, held_rows = features[order[held:]], features[order[:held]]
    mean = fit_rows.mean(axis=0)
    centred = fit_rows - mean
    covariance = centred.T @ centred / len(fit_rows)
    shrinkage = ledoit_wolf_shrinkage(centred)
    scale = float(np.trace(covariance)) / width
    if scale <= 0:
        raise OodError("reference features do not vary: all images look the same to this model")
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * scale * np.eye(width)
    shrunk += 1e-9 * scale * np.eye(width)  # keeps the inverse finite when shrinkage is ~0
    precision = np.linalg.inv(shrunk)
    precision = (precision + precision.T) / 2.0
    partial = OodStats(mean, precision, 1.0)
    held_distances = partial.exact_distances(held_rows)
    threshold = float(np.percentile(held_distances, percentile))
    stats = OodStats(mean, precision, max(threshold, 1e-12))
    meta = {
        "method": METHOD,
        "features": int(width),
        "reference_images": int(len(fit_rows)),
        "heldout_images": int(held),
        "percentile": float(percentile),
        "threshold": round(stats.threshold, 6),
        "shrinkage": round(shrinkage, 6),
        "heldout_flagged": float(np.mean(held_distances >= stats.threshold)),
    }
    return stats, meta


def combine(distances: Sequence[float], thresholds: Sequence[float], weights: Sequence[float]) -> float:
    """An ensemble's `ood_score`: the weighted mean of members' distance / threshold ratios."""
    ratios = np.asarray(distances, dtype=np.float64) / np.asarray(thresholds, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    return float((ratios * w).sum() / w.sum())


def manifest_entries(manifest: Optional[Manifest], members: Sequence["LoadedMember"]) -> list[Optional[dict]]:
    if manifest is None:
        return [None] * len(members)
    entries = {(e.name, e.precision): e.ood for e in manifest.members}
    return [entries.get((m.name, m.precision)) for m in members]


def member_stats(manifest: Optional[Manifest], member: "LoadedMember") -> Optional[OodStats]:
    """A bundle member's out-of-distribution statistics, checksummed and read (None without)."""
    entry = manifest_entries(manifest, [member])[0]
    if not entry:
        return None
    if member.features_output is None:
        raise BundleError(f"{member.source}: has out-of-distribution statistics but its graph gives no features output")
    path, sha256 = Path(entry["path"]), entry["sha256"]
    try:
        if verified_before(path, sha256):
            return OodStats.load(path)
        return OodStats.load(io.BytesIO(_read_verified(path, sha256)), where=str(path))
    except OodError as exc:
        raise BundleError(str(exc)) from None


def _read_verified(path: Path, sha256: str) -> bytes:
    """The file's bytes, read once, hashed and checked; a big file's check is remembered like a
    big member's (`machine.verified_before`: a 2,048-wide file is 33 MB, ~0.05 s to hash)."""
    stat_before = file_stat(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read out-of-distribution statistics: {exc.strerror or exc}") from None
    check_digest(path, sha256, hashlib.sha256(data).hexdigest())
    if len(data) >= OPTIMIZED_GRAPH_MIN_BYTES:
        remember_verified(path, sha256, stat_before)
    return data
