"""Fitting each member's out-of-distribution statistics at export, on its reference images.

The features come from the exported ONNX graph itself (its `pneumoedge_features` output,
through the same preprocessing), so export and runtime score the same numbers with the same
function (`pneumoedge.runtime.ood`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import FEATURES_OUTPUT, MemberSource
from pneumoedge.export.onnx_run import onnx_session
from pneumoedge.export.tensors import evenly, image_files, load_tensors
from pneumoedge.preprocessing import PreprocessSpec
from pneumoedge.runtime.ood import OodError, fit

log = logging.getLogger(__name__)

#: Reference images used at most (evenly picked): enough for a stable covariance, a bounded export.
MAX_REFERENCE_IMAGES = 1000


def graph_features(sessions: Sequence[Any], files: Sequence[Path], spec: PreprocessSpec, batch: int = 32) -> list[np.ndarray]:
    """Each session's (N, C) features over `files`, decoding each file once for all of them."""
    collected: list[list[np.ndarray]] = [[] for _ in sessions]
    for start in range(0, len(files), batch):
        tensors = load_tensors(files[start : start + batch], spec)
        for index, session in enumerate(sessions):
            name = session.get_inputs()[0].name
            out = session.run([FEATURES_OUTPUT], {name: tensors})[0]
            collected[index].append(np.asarray(out).reshape(len(tensors), -1))
    return [np.concatenate(parts) for parts in collected]


def pick(files: Sequence[Union[str, Path]]) -> list[Path]:
    """The reference images actually used: at most MAX_REFERENCE_IMAGES, evenly picked."""
    return evenly([Path(f) for f in files], MAX_REFERENCE_IMAGES)


def with_ood(
    sources: Sequence[MemberSource], references: Sequence[Union[str, Path]], work: Path, *, described: str, seed: int = 0
) -> tuple[list[MemberSource], dict[str, Any]]:
    """Sources of one model (its fp32 and int8 files, same spec) with statistics fitted on `references`.

    Sources whose graph has no features output are returned unchanged, and the summary says so.
    """
    files = pick(references)
    usable = [s for s in sources if s.explain and s.explain.get("features_output") == FEATURES_OUTPUT]
    if not usable:
        return list(sources), {"available": False, "reason": "the graph has no features output (no heatmap layer found)"}
    sessions = [onnx_session(s.onnx_path, threads=2) for s in usable]
    features = graph_features(sessions, files, usable[0].spec)
    fitted: dict[int, MemberSource] = {}
    summary: dict[str, Any] = {"available": True, "reference": described}
    for source, feats in zip(usable, features):
        try:
            stats, meta = fit(feats, seed=seed)
        except OodError as exc:
            log.warning("%s %s: no out-of-distribution statistics: %s", source.name, source.precision, exc)
            summary[source.precision] = {"available": False, "reason": str(exc)}
            continue
        path = stats.save(work / f"{source.name}.{source.precision}.ood.npz")
        meta = {**meta, "reference": described}
        fitted[id(source)] = replace(source, ood_file=path, ood=meta)
        summary[source.precision] = meta
    summary["available"] = bool(fitted)
    return [fitted.get(id(s), s) for s in sources], summary


def reference_files(folder: Optional[Union[str, Path]]) -> list[Path]:
    """Image files of a `--reference` folder (recursive, evenly picked up to the limit)."""
    if folder is None:
        return []
    return image_files(folder, limit=MAX_REFERENCE_IMAGES)
