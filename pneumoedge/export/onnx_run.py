"""Plain onnxruntime sessions and batched runs for the export side's checks (parity, int8, heatmaps).

The runtime has its own session factory (providers, threads, graph caches); the checks here
want one CPU session with fixed threads and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import HEATMAP_OUTPUT, apply_activation
from pneumoedge.validation.metrics import class_probabilities


def onnx_session(path: Union[str, Path], threads: int = 1) -> Any:
    """A plain CPU onnxruntime session for checks."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_output(session: Any, tensors: np.ndarray, output: Optional[str] = None, batch_size: int = 16) -> np.ndarray:
    """One output (default: the first) of a one-input session over (N, ...) tensors, in batches."""
    name = session.get_inputs()[0].name
    output = output or session.get_outputs()[0].name
    outputs = []
    for start in range(0, len(tensors), batch_size):
        batch = np.ascontiguousarray(tensors[start : start + batch_size], dtype=np.float32)
        outputs.append(session.run([output], {name: batch})[0])
    return np.concatenate(outputs, axis=0)


def run_onnx(session: Any, tensors: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Raw class output (the first) of a session over (N, ...) tensors, as (N, K)."""
    return run_output(session, tensors, batch_size=batch_size).reshape(len(tensors), -1)


def run_heatmaps(session: Any, tensors: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The heatmap output of a session over (N, ...) tensors: (N, h, w)."""
    return run_output(session, tensors, HEATMAP_OUTPUT, batch_size)


def ensemble_probabilities(
    paths: Sequence[Path], weights: Sequence[float], activations: Sequence[str], tensors: Sequence[np.ndarray]
) -> np.ndarray:
    """The weighted mean of members' class probabilities, each member on its own tensors: (N, K)."""
    total = None
    for path, weight, activation, x in zip(paths, weights, activations, tensors):
        p = class_probabilities(apply_activation(run_onnx(onnx_session(path, threads=2), x), activation)) * weight
        total = p if total is None else total + p
    return total / float(sum(weights))
