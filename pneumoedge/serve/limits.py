"""Bounded work: admission of requests (503 when full) and the thread pool that runs the model.

The event loop never runs the model: each file is predicted in a worker thread (onnxruntime and
OpenCV release the GIL), so health checks and the page answer while uploads are processed.
A request takes an admission slot only once its body has been read, and holds it until its
answer is ready: clients still uploading (however slowly) never keep a ready request from the
model. Bodies being read are bounded by the connection limit (uvicorn's `limit_concurrency`)
and cut off by the upload deadline and minimum rate (`serve.uploads.body_chunks`).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

from pneumoedge.serve.settings import RETRY_AFTER_S

T = TypeVar("T")


class HTTPProblem(Exception):
    """A request refused with an HTTP status and a reason meant for the user."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class QueueFull(HTTPProblem):
    def __init__(self, limit: int) -> None:
        super().__init__(
            503,
            f"the server is busy ({limit} requests in progress); retry in {RETRY_AFTER_S} s",
            {"Retry-After": str(RETRY_AFTER_S)},
        )


class WorkQueue:
    """At most `limit` requests admitted at once; their model runs on `threads` worker threads."""

    def __init__(self, limit: int, threads: int) -> None:
        self.limit = limit
        self.threads = threads
        self.pending = 0  # only touched on the event loop thread
        self.refused = 0
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="pneumoedge-serve")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a slot for one request, or raise `QueueFull` (503 + Retry-After) at once."""
        if self.pending >= self.limit:
            self.refused += 1
            raise QueueFull(self.limit)
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` on a worker thread, off the event loop."""
        self.start()
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)
