"""Request bodies to in-memory uploads: size limit enforced while streaming, multipart by python-multipart.

Starlette's own form parsing spools files over 1 MB to temporary files on disk; uploads here
must never touch the disk (they are patients' images), so the body is fed chunk by chunk to
python-multipart's streaming parser and each file is collected in memory.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from pneumoedge.formats import ImageError, sniff
from pneumoedge.serve.limits import HTTPProblem
from pneumoedge.serve.settings import ServeSettings

#: Content types accepted for a raw (non-multipart) body; the content itself decides the format.
RAW_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/bmp", "image/tiff", "application/dicom", "application/octet-stream"}
)


@dataclass(frozen=True)
class Upload:
    """One uploaded file. `name` is the client's file name: returned to it, never logged."""

    name: str
    data: bytes


async def read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The files of a predict request: multipart (one or many) or one raw body with its type."""
    mime, params = parse_options_header(request.headers.get("content-type", ""))
    mime_text = mime.decode("latin-1").lower()
    if mime_text == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise HTTPProblem(400, "malformed multipart request: the Content-Type has no boundary")
        return _none_empty(await _read_multipart(request, boundary, settings))
    if mime_text in RAW_TYPES:
        data = b"".join([chunk async for chunk in body_chunks(request, settings)])
        return _none_empty([Upload(_basename(request.query_params.get("filename", "")) or "upload", data)])
    shown = mime_text or "none"
    raise HTTPProblem(
        415,
        f"unsupported Content-Type {shown!r}: send multipart/form-data with file fields, or one image "
        f"as the body with Content-Type one of {', '.join(sorted(RAW_TYPES))}",
    )


def _none_empty(uploads: list[Upload]) -> list[Upload]:
    """The uploads, or 422 for the request when one is empty (a broken client: the schema says minLength 1)."""
    empty = [upload.name for upload in uploads if not upload.data]
    if empty:
        raise HTTPProblem(
            422, f"empty file (0 bytes): {', '.join(empty)}: was the upload cut off, or the file still being written?"
        )
    return uploads


async def body_chunks(request: Request, settings: ServeSettings) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; 413 as soon as it passes the limit, 408 when it is too slow.

    Too slow is any of: nothing received for `body_timeout_s`; the whole body not in within
    `body_deadline_s`; after the first `rate_grace_s`, fewer than `min_upload_rate` bytes per
    second on average since the start. A client sending one byte every few seconds is cut off
    after the grace period, instead of holding a connection (and memory) for as long as it likes.
    """
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPProblem(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HTTPProblem(413, _too_large(limit, f"declares {int(declared):,} bytes"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    stream = request.stream().__aiter__()
    while True:
        wait, reason = _next_wait(settings, received, loop.time() - started)
        if wait <= 0:
            raise HTTPProblem(408, reason)
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise HTTPProblem(408, _next_wait(settings, received, loop.time() - started)[1]) from None
        received += len(chunk)
        if received > limit:
            raise HTTPProblem(413, _too_large(limit, f"passed {limit:,} bytes while uploading"))
        if chunk:
            yield chunk


def _next_wait(settings: ServeSettings, received: int, elapsed: float) -> tuple[float, str]:
    """How long to wait for the next chunk, and the reason to give if it does not come in time."""
    limits = [
        (settings.body_timeout_s, f"the upload stalled: nothing received for {settings.body_timeout_s:g} s"),
        (settings.body_deadline_s - elapsed, f"the upload took longer than {settings.body_deadline_s:g} s (serve --upload-deadline)"),
    ]
    if settings.min_upload_rate > 0:
        # The moment the average rate since the start falls below the minimum, given what has arrived.
        falls_below = settings.rate_grace_s + received / settings.min_upload_rate
        limits.append(
            (falls_below - elapsed, f"the upload is too slow: under {settings.min_upload_rate / 1024:g} KB/s (serve --min-upload-rate)")
        )
    return min(limits, key=lambda limit: limit[0])


#: Unread body left to uvicorn to discard (keeping the connection) after an early refusal; with
#: more, or an unknown length, the connection is closed instead (as Go's net/http does at 256 KB).
DISCARD_LIMIT = 256 * 1024


def must_close(request: Request, status: int) -> bool:
    """Whether a refusal given before the body was read should close the connection.

    Always for 408 and 413 (the body is slow or large); otherwise when what is left to read may
    be large. A small body is better discarded: closing a socket with unread input makes the
    kernel reset it, and a reset can destroy the refusal before the client reads it.
    """
    if status in (408, 413):
        return True
    declared = request.headers.get("content-length", "").strip()
    return not declared.isdigit() or int(declared) > DISCARD_LIMIT


def _too_large(limit: int, what: str) -> str:
    return f"request too large: the body {what}; the limit is {limit / 2**20:g} MB (serve --max-upload-mb)"


class _Collector:
    """python-multipart callbacks that keep file parts in memory."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[Upload] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._name: Optional[str] = None
        self._data: list[memoryview] = []

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name, self._data = {}, None, []

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:
            return  # a plain form field, not a file: ignored
        if len(self.files) >= self.max_files:
            raise HTTPProblem(413, f"too many files in one request (the limit is {self.max_files})")
        self._name = _basename(filename.decode("utf-8", "replace")) or f"file {len(self.files) + 1}"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name is not None:
            self._data.append(memoryview(data)[start:end])  # no copy until the one join at the end

    def _part_end(self) -> None:
        if self._name is not None:
            self.files.append(Upload(self._name, b"".join(self._data)))
        self._name, self._data = None, []

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(request: Request, boundary: bytes, settings: ServeSettings) -> list[Upload]:
    collector = _Collector(settings.max_files)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in body_chunks(request, settings):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPProblem(400, f"malformed multipart request: {exc}") from None
    if not collector.ended:
        raise HTTPProblem(400, "malformed multipart request: the body ended before its closing boundary")
    if not collector.files:
        raise HTTPProblem(422, "no file in the request: send each image as a multipart file field (e.g. curl -F file=@image.jpeg)")
    return collector.files


def _basename(name: str) -> str:
    """The last component of a client's file name (browsers on Windows may send a full path)."""
    return name.replace("\\", "/").rsplit("/", 1)[-1].strip()[:255]


def keep(uploads: list[Upload], folder: Path, request_id: str) -> list[Path]:
    """Write uploads to `folder` as REQUESTID-N.KIND, readable by the server's user only.

    Never under the client's name: it may identify a patient.
    """
    written = []
    for index, upload in enumerate(uploads, 1):
        try:
            kind = sniff(upload.data[:1024] if len(upload.data) > 1024 else upload.data)
        except ImageError:
            kind = "bin"
        path = folder / f"{request_id}-{index}.{kind}"
        # Owner-only from the moment it exists (0600 whatever the umask): patients' images.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(upload.data)
        written.append(path)
    return written
