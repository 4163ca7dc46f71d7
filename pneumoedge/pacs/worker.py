"""The worker: spooled instances, oldest first, through `Ensemble.predict_many` (as `infer`), to rows and SRs.

For each instance, in this order: result objects (SR, overlay SC) into the outbox, then the
result row (the commit point), then the spool file is removed. A crash anywhere redoes at
most the uncommitted instance, and its objects get the same UIDs, so nothing is duplicated.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoedge.dicom import not_a_radiograph, quiet_pydicom
from pneumoedge.pacs import report
from pneumoedge.pacs.ledger import Ledger
from pneumoedge.pacs.send import Outbox
from pneumoedge.pacs.spool import Spool, key_of
from pneumoedge.runtime.ensemble import Ensemble, Prediction

log = logging.getLogger(__name__)

CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")


@dataclass
class WorkStats:
    statuses: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    duplicates: int = 0
    objects: int = 0
    #: Seconds in predict_many (decode + models) and building/queuing SR and SC objects.
    classify_s: float = 0.0
    report_s: float = 0.0


@dataclass
class _Job:
    path: Path
    header: Any = None
    extra: dict = field(default_factory=dict)
    skip: str = ""
    error: str = ""

    @property
    def uid(self) -> str:
        return self.extra["SOPInstanceUID"]


def not_chest_reason(header: Any) -> str:
    """Why the header says this is not a single-frame chest radiograph ("" when it is one).

    The modality is `pneumoedge.dicom.not_a_radiograph`, the rule `infer` and `serve` apply too.
    A missing BodyPartExamined is accepted: many chest radiographs leave it empty.
    """
    refusal = not_a_radiograph(header)
    if refusal:
        return refusal
    part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if part and part not in CHEST_BODY_PARTS:
        return f"BodyPartExamined is {part}, not a chest"
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        return f"multi-frame ({frames} frames), not a single radiograph"
    return ""


def _received(path: Path) -> str:
    try:
        ns = int(path.name.split("-", 1)[0])
    except ValueError:
        return ""
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds")


class Worker:
    """Drains the spool into the ledger and the outbox. `run()` loops until `stop()`."""

    def __init__(
        self,
        ensemble: Ensemble,
        spool: Spool,
        ledger: Ledger,
        outbox: Outbox,
        *,
        heatmaps: bool = False,
        batch_size: int = 8,
    ) -> None:
        self.ensemble = ensemble
        self.spool, self.ledger, self.outbox = spool, ledger, outbox
        self.identity = report.model_identity(ensemble)
        self.explain = heatmaps and bool(getattr(ensemble, "can_explain", False))
        if heatmaps and not self.explain:
            note = getattr(ensemble, "explain_note", "") or "this version of pneumoedge or this model cannot compute heatmaps"
            log.warning("--heatmaps: no overlays will be sent (%s); SRs are sent as usual", note)
        self.batch_size = batch_size
        self.stats = WorkStats()
        #: Pause before retrying after an unexpected failure (a full disk, say).
        self.retry_s = 5.0
        self._stop = threading.Event()
        #: Spool files being worked on -> their SOP Instance UID ("" until read), so a second
        #: copy of an instance still in flight is a duplicate too.
        self._claimed: dict[Path, str] = {}
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop.set()
        self.spool.wake()

    def run(self) -> None:
        """Until `stop()`: classify batch N+1 while another thread builds and commits batch N.

        onnxruntime and most of the decoding release the GIL, so the models run while highdicom
        (pure Python) builds the previous batch's SRs. Commits stay in arrival order (one
        committer, a FIFO queue of batches).
        """
        batches: queue.Queue = queue.Queue(maxsize=2)
        committer = threading.Thread(target=self._commit_loop, args=(batches,), name="pneumoedge-commit", daemon=True)
        committer.start()
        try:
            while not self._stop.is_set():
                files = self._claim()
                if not files:
                    self.spool.wait(0.5)
                    continue
                try:
                    batches.put(self._classify(files))
                except Exception:  # noqa: BLE001 - the files stay spooled; say so, retry
                    self._release(files)
                    log.exception("worker: classification failed; the instances stay in %s, retried in %.0f s", self.spool.folder, self.retry_s)
                    self._stop.wait(self.retry_s)
        finally:
            batches.put(None)
            committer.join()

    def _commit_loop(self, batches: queue.Queue) -> None:
        while True:
            batch = batches.get()
            if batch is None:
                return
            try:
                for job, prediction in batch:
                    self._commit(job, prediction)
            except Exception:  # noqa: BLE001 - e.g. a full disk: uncommitted instances stay spooled and are retried
                log.exception("worker: committing results failed; the instances stay in %s, retried in %.0f s", self.spool.folder, self.retry_s)
                self._stop.wait(self.retry_s)
            finally:
                self._release([job.path for job, _ in batch])

    def process_available(self) -> int:
        """Process what is in the spool now, batch after batch in this thread; return how many were handled."""
        handled = 0
        while not self._stop.is_set():
            files = self._claim()
            if not files:
                break
            try:
                for job, prediction in self._classify(files):
                    self._commit(job, prediction)
            finally:
                self._release(files)
            handled += len(files)
        return handled

    def _claim(self) -> list[Path]:
        """The oldest spooled files not already being worked on, at most one batch."""
        with self._lock:
            files = [p for p in self.spool.pending() if p not in self._claimed][: self.batch_size]
            self._claimed.update((p, "") for p in files)
        return files

    def _release(self, paths: list[Path]) -> None:
        with self._lock:
            for path in paths:
                self._claimed.pop(path, None)

    def _classify(self, files: list[Path]) -> list[tuple[_Job, Prediction]]:
        """Inspect and classify claimed files; duplicates (done, or in flight) are dropped here."""
        jobs: list[_Job] = []
        for path in files:
            job = self._inspect(path)
            with self._lock:
                duplicate = job.uid in self.ledger or job.uid in self._claimed.values()
                if not duplicate:
                    self._claimed[path] = job.uid
            if duplicate:
                self.stats.duplicates += 1
                log.info("duplicate %s from %s: already has a result row", job.uid, job.extra["calling_ae"] or "?")
                path.unlink(missing_ok=True)
                continue
            jobs.append(job)
        to_classify = [job for job in jobs if not (job.skip or job.error)]
        by_path = {}
        if to_classify:
            started = time.perf_counter()
            kwargs = {"explain": True} if self.explain else {}
            predictions = self.ensemble.predict_many([str(j.path) for j in to_classify], batch_size=len(to_classify), **kwargs)
            by_path = {j.path: p for j, p in zip(to_classify, predictions)}
            self.stats.classify_s += time.perf_counter() - started
        batch = []
        for job in jobs:
            if job.error:
                prediction = Prediction(source=job.uid, status="error", error=job.error)
            elif job.skip:
                prediction = Prediction(source=job.uid, status="skipped", error=job.skip)
            else:
                prediction = dataclasses.replace(by_path[job.path], source=job.uid)
            batch.append((job, prediction))
        return batch

    def _inspect(self, path: Path) -> _Job:
        import pydicom

        job = _Job(path, extra={"SOPInstanceUID": key_of(path), "calling_ae": "", "received": _received(path), "sr": ""})
        notes: list[str] = []
        try:
            with quiet_pydicom() as notes:  # its complaints about a header belong in the row, not in the node's log
                header = pydicom.dcmread(path, stop_before_pixels=True)
            job.header = header
            job.extra.update(
                StudyInstanceUID=str(header.get("StudyInstanceUID", "")),
                SeriesInstanceUID=str(header.get("SeriesInstanceUID", "")),
                SOPInstanceUID=str(header.get("SOPInstanceUID", "") or key_of(path)),
                calling_ae=str(header.file_meta.get("SourceApplicationEntityTitle", "") or "").strip(),
            )
            job.skip = not_chest_reason(header)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input; it becomes a row
            job.error = f"cannot read the DICOM header: {' '.join(str(exc).split())[:300]}"
            if notes:
                job.error += f" (pydicom: {'; '.join(notes)[:300]})"
        return job

    def _commit(self, job: _Job, prediction: Prediction) -> None:
        # highdicom reads the header's values through pydicom: its complaints stay out of the log.
        with quiet_pydicom():
            self._commit_quietly(job, prediction)

    def _commit_quietly(self, job: _Job, prediction: Prediction) -> None:
        if prediction.status == "error" and job.header is not None:
            try:  # the PACS hears back for this image too: an SR saying it could not be analysed
                sr = report.build_error_sr(job.header, prediction.error or "unknown reason", self.identity)
                self._queue(sr)
                job.extra["sr"] = str(sr.SOPInstanceUID)
            except OSError:
                raise
            except Exception:  # noqa: BLE001 - the row still records the error
                log.exception("%s: could not build the SR for the error", job.uid)
        if prediction.status == "ok":
            started = time.perf_counter()
            try:
                job.extra["sr"] = self._result_objects(job, prediction)
                self.stats.report_s += time.perf_counter() - started
            except OSError:  # the outbox cannot be written (disk full): keep the instance spooled, retry later
                raise
            except Exception as exc:  # noqa: BLE001 - the row still records the classification
                log.exception("%s: could not build the result objects", job.uid)
                prediction = dataclasses.replace(prediction, error=f"no SR: {' '.join(str(exc).split())[:300]}")
        self.ledger.write(prediction, job.extra)
        job.path.unlink(missing_ok=True)
        self.stats.statuses[prediction.status] += 1
        if prediction.label:
            self.stats.labels[prediction.label] += 1
        detail = f"{prediction.label} p={prediction.probability:.3f}" if prediction.status == "ok" else prediction.error
        log.info(
            "%s sop=%s study=%s ae=%s %s",
            prediction.status, job.uid, job.extra.get("StudyInstanceUID", ""), job.extra["calling_ae"] or "?", detail,
        )

    def _result_objects(self, job: _Job, prediction: Prediction) -> str:
        """Write the overlay SC (when there is one) and the SR to the outbox; return the SR's UID."""
        if self.explain:
            overlay = report.overlay_of(prediction, self.identity)
            if overlay is not None:
                self._queue(report.build_sc(job.header, overlay, self.identity))
        sr = report.build_sr(job.header, prediction, self.identity)
        self._queue(sr)
        return str(sr.SOPInstanceUID)

    def _queue(self, dataset: Any) -> None:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        self.outbox.put(str(dataset.SOPInstanceUID), buffer.getvalue())
        self.stats.objects += 1
