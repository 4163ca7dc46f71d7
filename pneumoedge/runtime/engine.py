"""Engines: where the predictions of a folder run are computed (threads here, or a cluster).

`run_folder` (pneumoedge.runtime.folder) owns everything a run promises: discovery,
skipped/error rows, `--resume`, one whole line per write, the summary and exit code. An engine
only turns a stream of image paths into `Prediction`s. Every engine must:

- yield exactly one `Prediction` per path it was given (status "ok" or "error": an
  unreadable file, a crashed worker or a timeout is an error row with its reason, never a
  missing row and never an exception out of `predict`), with `source == str(path)`;
- compute them with `Ensemble.predict_many` of a `pneumoedge.load(...)` of the same model,
  so every engine gives the same probabilities;
- apply `postprocess` (e.g. writing an overlay PNG) to each ok prediction before yielding it;
- iterate `paths` on the thread that iterates its result (`run_folder` writes the skipped and
  error rows of non-images while `paths` is iterated; `ResultWriter` is not shared between
  threads), and lazily: a folder of millions of files is never a list in memory;
- release what it started (threads, processes, clusters) when `close()` is called or the
  iterator is exhausted.

Rows may come back in any order; `run_folder` does not rely on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol, runtime_checkable

from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.prediction import Prediction

#: A function applied to each ok prediction where it is computed (e.g. writing its overlay).
Postprocess = Callable[[Prediction], Prediction]

__all__ = ["Engine", "LocalEngine", "Postprocess"]


@runtime_checkable
class Engine(Protocol):
    """Computes one `Prediction` per image path; see the module docstring for the contract."""

    #: Shown in the run summary ("CPUExecutionProvider", "ray: 4 actors x CPUExecutionProvider", ...).
    provider: str

    def predict(
        self, paths: Iterable[Path], *, explain: bool = False, postprocess: Optional[Postprocess] = None
    ) -> Iterator[Prediction]:
        """One Prediction per path; `explain` asks for heatmaps (the row then carries `explanation`)."""
        ...

    def close(self) -> None:
        """Release workers; called once by `run_folder` when the run ends, also on failure."""
        ...


class LocalEngine:
    """This process: decoding threads and session runner threads (`Ensemble.predict_many`)."""

    def __init__(self, ensemble: Ensemble, *, batch_size: int = 8, workers: Optional[int] = None) -> None:
        self.ensemble = ensemble
        self.batch_size = batch_size
        self.workers = workers

    @property
    def provider(self) -> str:
        return self.ensemble.provider

    def predict(
        self, paths: Iterable[Path], *, explain: bool = False, postprocess: Optional[Postprocess] = None
    ) -> Iterator[Prediction]:
        return self.ensemble.predict_many(
            paths, batch_size=self.batch_size, workers=self.workers, explain=explain, postprocess=postprocess
        )

    def close(self) -> None:
        """Nothing to release: `predict_many`'s thread pools end with its iterator."""
