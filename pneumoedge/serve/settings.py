"""The web service's settings, in one place: limits, auth, allowed hosts, where (if anywhere) uploads are kept."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pneumoedge.network import is_loopback

#: Largest request body accepted by default (bytes): above any chest radiograph, JPEG or DICOM.
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
#: Requests admitted to the model at once (bodies read, waiting or running); more get 503 + Retry-After.
DEFAULT_QUEUE_LIMIT = 32
#: Files accepted in one multipart request.
DEFAULT_MAX_FILES = 64
#: Seconds a client may stay silent while sending a body before it gets 408 (a stalled upload).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Seconds a whole request body may take, however it trickles (64 MB in 120 s: about 0.55 MB/s).
DEFAULT_BODY_DEADLINE_S = 120.0
#: Slowest average upload rate accepted (bytes/s), counted after the first RATE_GRACE_S seconds.
DEFAULT_MIN_UPLOAD_RATE = 16 * 1024
#: Seconds at the start of a body during which the rate is not checked (slow starts, small files).
RATE_GRACE_S = 10.0
#: Open connections at once (uvicorn's limit_concurrency); more get 503 from uvicorn itself.
#: With the upload limit it bounds the memory held by bodies being read.
DEFAULT_MAX_CONNECTIONS = 64
#: Seconds a connection may take to send a request's headers (at its start or between requests).
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Seconds a client is told to wait after a 503.
RETRY_AFTER_S = 1

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class HostPolicy:
    """Which `Host` header values the server answers: the names it was started for.

    A web page cannot reach the server through DNS rebinding (a name of the attacker's that
    resolves to 127.0.0.1): its requests carry that name in `Host` and are refused.
    An IP literal is accepted only when `any_ip` (a wildcard bind) or when it is listed.
    """

    names: frozenset[str] = frozenset(_LOOPBACK_NAMES)
    any_ip: bool = False

    def allows(self, host_header: str) -> bool:
        """Whether a `Host` header value (name or address, with or without port) is one of ours."""
        name = host_name(host_header)
        if not name:
            return False
        if name in self.names:
            return True
        return self.any_ip and _is_ip(name)

    @classmethod
    def for_bind(cls, host: str, extra: Iterable[str] = ()) -> "HostPolicy":
        """The policy for a server bound to `host`, plus the names in `extra` (e.g. a reverse proxy's)."""
        names = {host_name(host) or host.lower(), *(host_name(name) or name.lower() for name in extra)}
        if is_loopback(host):
            names.update(_LOOPBACK_NAMES)
            return cls(frozenset(names))
        names.update(_LOOPBACK_NAMES)  # a wildcard bind also answers on loopback
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower().rstrip("."))
        wildcard = host in ("0.0.0.0", "::", "")
        return cls(frozenset(names), any_ip=wildcard)


def host_name(value: str) -> str:
    """The host part of a `Host` header or an Origin's netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    if value.count(":") > 1:  # a bare IPv6 address (not valid in Host, but a bind address)
        return value
    return value.partition(":")[0].rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ServeSettings:
    """How the app limits, authenticates and records requests."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    max_files: int = DEFAULT_MAX_FILES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    body_deadline_s: float = DEFAULT_BODY_DEADLINE_S
    #: Bytes per second, averaged from the start of the body, once `rate_grace_s` have passed.
    min_upload_rate: float = DEFAULT_MIN_UPLOAD_RATE
    rate_grace_s: float = RATE_GRACE_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    #: Threads running the model (None: one per CPU core).
    inference_threads: Optional[int] = None
    #: Bearer token required on the page and the API (None: no authentication).
    token: Optional[str] = None
    #: Folder where uploads are written (None: they stay in memory and are dropped).
    keep_uploads: Optional[Path] = None
    #: Host names answered (the loopback names unless the command says otherwise).
    hosts: HostPolicy = field(default_factory=HostPolicy)

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"the upload limit must be positive, got {self.max_upload_bytes}")
        if self.queue_limit < 1:
            raise ValueError(f"the queue limit must be at least 1, got {self.queue_limit}")
        if self.max_files < 1:
            raise ValueError(f"the file limit must be at least 1, got {self.max_files}")
        if self.body_deadline_s <= 0 or self.body_timeout_s <= 0 or self.header_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.min_upload_rate < 0:
            raise ValueError(f"the minimum upload rate cannot be negative, got {self.min_upload_rate}")
        if self.max_connections < 1:
            raise ValueError(f"the connection limit must be at least 1, got {self.max_connections}")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the token must be at least 16 characters (make one with: openssl rand -hex 16)")

    @property
    def threads(self) -> int:
        return self.inference_threads or os.cpu_count() or 1

