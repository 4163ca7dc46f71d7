"""The web service's settings, in one place: limits, auth, where (if anywhere) uploads are kept."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: Largest request body accepted by default (bytes): above any chest radiograph, JPEG or DICOM.
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
#: Requests admitted at once (uploading, queued or running); more get 503 + Retry-After.
#: Worst-case memory for bodies is this times the upload limit.
DEFAULT_QUEUE_LIMIT = 32
#: Files accepted in one multipart request.
DEFAULT_MAX_FILES = 64
#: Seconds a client may stay silent while sending a body before it gets 408 (trickle uploads).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Seconds a client is told to wait after a 503.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeSettings:
    """How the app limits, authenticates and records requests."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    max_files: int = DEFAULT_MAX_FILES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    #: Threads running the model (None: one per CPU core).
    inference_threads: Optional[int] = None
    #: Bearer token required on the page and the API (None: no authentication).
    token: Optional[str] = None
    #: Folder where uploads are written (None: they stay in memory and are dropped).
    keep_uploads: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"the upload limit must be positive, got {self.max_upload_bytes}")
        if self.queue_limit < 1:
            raise ValueError(f"the queue limit must be at least 1, got {self.queue_limit}")
        if self.max_files < 1:
            raise ValueError(f"the file limit must be at least 1, got {self.max_files}")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the token must be at least 16 characters (make one with: openssl rand -hex 16)")

    @property
    def threads(self) -> int:
        return self.inference_threads or os.cpu_count() or 1


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
