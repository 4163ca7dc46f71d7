"""The one place that creates onnxruntime sessions: providers (cpu/cuda/auto) and threads."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional, Union

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from pneumoedge.bundle import BundleError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_SWAP_HINT = (
    "install the GPU build of onnxruntime instead of the CPU one (they cannot share an environment): "
    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
)


class DeviceError(RuntimeError):
    """The requested device cannot be used; never answered by a silent fallback."""


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


#: Whether idle onnxruntime pool threads busy-wait for work. Off: while the sessions wait
#: between runs, spinning threads would take the cores that predict_many's decode threads
#: (and anything else on a small shared workstation) need; benchmarks/compare.py measures both.
ALLOW_SPINNING = False


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    """Session options chosen deliberately: full graph optimisation, sequential execution.

    `threads` sets intra-op threads (None: onnxruntime's default, one per physical core).
    Inter-op stays at 1 because these CNNs are a chain of ops with nothing to run in parallel.
    Idle threads sleep instead of spinning (see `ALLOW_SPINNING`).
    """
    options = ort.SessionOptions()
    spin = "1" if ALLOW_SPINNING else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise here
    return options


def create_session(
    model: Union[str, Path, bytes],
    device: str = "cpu",
    threads: Optional[int] = None,
    *,
    optimized_cache: Optional[Path] = None,
) -> ort.InferenceSession:
    """Create an inference session on `device` ("cpu", "cuda" or "auto").

    "cuda" fails with `DeviceError` when CUDA cannot be used, including the quiet case where
    onnxruntime lists the CUDA provider but the session drops to CPU (a missing cuDNN or
    cuBLAS library). "auto" takes CUDA when it works and CPU otherwise, and logs which.
    The provider that actually runs is `session.get_providers()[0]`.

    `optimized_cache` (CPU only): a file for onnxruntime's optimized graph of this model. Its
    path must name the model's checksum, this CPU and this onnxruntime (the optimized graph
    holds kernels chosen for them). The first session writes it aside, and `commit_optimized`
    puts it in place once the caller has verified the model's checksum; later sessions load it
    with no further optimisation: an Xception's session then costs ~0.08 s of CPU instead of
    0.25-0.45 s (docs/speed.md).
    """
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {DEVICES}, got {device!r}")
    source = str(model) if isinstance(model, Path) else model
    options = session_options(threads)
    if device == "cpu" and optimized_cache is not None:
        return _cached_cpu_session(source, options, optimized_cache)
    if device == "cpu":
        return ort.InferenceSession(source, sess_options=options, providers=[CPU])
    if CUDA not in available_providers():
        if device == "cuda":
            raise DeviceError(
                "--device cuda was asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available_providers())}); {_SWAP_HINT}"
            )
        log.info("no CUDA provider in this onnxruntime; running on CPU")
        return ort.InferenceSession(source, sess_options=options, providers=[CPU])
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=[CUDA, CPU])
    except Exception as exc:  # onnxruntime raises its own untyped errors when CUDA libraries fail
        if device == "cuda":
            raise DeviceError(f"CUDA session could not be created: {exc}") from None
        log.warning("CUDA session failed (%s); running on CPU", exc)
        return ort.InferenceSession(source, sess_options=options, providers=[CPU])
    if session.get_providers()[0] != CUDA:
        if device == "cuda":
            raise DeviceError(
                "onnxruntime lists CUDAExecutionProvider but the session fell back to CPU "
                "(usually missing cuDNN/cuBLAS libraries matching this onnxruntime-gpu build)"
            )
        log.warning("CUDA provider did not load; running on CPU")
    return session


#: onnxruntime's errors for a file that is not a loadable model (as opposed to device errors).
MODEL_LOAD_ERRORS = (ort_state.InvalidProtobuf, ort_state.Fail, ort_state.InvalidGraph, ort_state.NoSuchFile, ort_state.InvalidArgument)


def open_model(
    path: Union[str, Path],
    device: str = "cpu",
    threads: Optional[int] = None,
    *,
    data: Optional[bytes] = None,
    optimized_cache: Optional[Path] = None,
) -> ort.InferenceSession:
    """`create_session` for a model file (or its bytes `data`, already read from `path`); a file
    onnxruntime cannot load is a `BundleError` naming `path`."""
    try:
        return create_session(data if data is not None else path, device, threads, optimized_cache=optimized_cache)
    except MODEL_LOAD_ERRORS as exc:
        raise BundleError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None


def _cached_cpu_session(source: Union[str, bytes], options: ort.SessionOptions, cache: Path) -> ort.InferenceSession:
    """Load the cached optimized graph, or build the session and write that graph for next time.

    A cache file that onnxruntime cannot load is removed and rebuilt; a cache that cannot be
    written (read-only home, full disk) only costs the saving, never the run.
    """
    if cache.is_file():
        cached = session_options(options.intra_op_num_threads or None)
        cached.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cache), sess_options=cached, providers=[CPU])
        except Exception as exc:  # onnxruntime's untyped load errors: a damaged cache file
            log.warning("optimized-graph cache %s unusable (%s); rebuilding it", cache, str(exc).splitlines()[0])
            cache.unlink(missing_ok=True)
    partial = _partial(cache)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(partial)
    except OSError as exc:
        log.info("optimized-graph cache %s not writable (%s)", cache.parent, exc)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=[CPU])
    except Exception:
        partial.unlink(missing_ok=True)
        raise


def _partial(cache: Path) -> Path:
    return cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.partial")


def commit_optimized(cache: Path, verified: bool) -> None:
    """Put the optimized graph this thread's `create_session` wrote in place (or drop it).

    Called after the model's checksum was checked: a changed model file must never leave its
    graph in the cache under the genuine checksum's name.
    """
    partial = _partial(cache)
    try:
        if verified and partial.is_file():
            os.replace(partial, cache)  # atomic: readers never see half a file
        else:
            partial.unlink(missing_ok=True)
    except OSError as exc:
        log.info("optimized-graph cache %s not written (%s)", cache, exc)
