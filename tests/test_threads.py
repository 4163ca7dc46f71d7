"""One loaded model shared by many threads gives what it gives serially."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pneumoedge


def _probabilities(prediction) -> tuple:
    members = tuple(sorted((name, tuple(sorted(p.items()))) for name, p in prediction.member_probabilities.items()))
    return prediction.status, prediction.label, tuple(sorted(prediction.probabilities.items())), members


def test_predict_from_8_threads_at_once_matches_serial(bundle_dir: Path, image_folder: Path) -> None:
    model = pneumoedge.load(bundle_dir, threads=1)
    paths = sorted(str(p) for p in image_folder.rglob("*.*"))
    serial = {path: _probabilities(model.predict(path)) for path in paths}
    start = threading.Barrier(8)

    def worker(offset: int) -> dict:
        start.wait()  # all eight call predict at the same moment
        rotated = paths[offset % len(paths) :] + paths[: offset % len(paths)]
        return {path: _probabilities(model.predict(path)) for path in rotated * 3}

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    for result in results:
        assert result == serial


def test_predict_many_from_several_threads_at_once_matches_serial(bundle_dir: Path, image_folder: Path) -> None:
    model = pneumoedge.load(bundle_dir)
    paths = sorted(str(p) for p in image_folder.rglob("*.*")) * 4
    serial = [_probabilities(p) for p in model.predict_many(paths, batch_size=1)]
    start = threading.Barrier(4)

    def worker(_: int) -> list:
        start.wait()
        return [_probabilities(p) for p in model.predict_many(paths, batch_size=1, workers=2)]

    with ThreadPoolExecutor(4) as pool:
        for result in pool.map(worker, range(4)):
            assert result == serial
