"""uvicorn's configuration for `pneumoedge serve`: its own limits, plus the header timeout it lacks.

uvicorn (0.55) times out idle keep-alive connections but not a client that sends its request
headers slowly, or never: one byte a minute keeps a connection (and a slot under
`limit_concurrency`) forever. `header_timeout_protocol` closes a connection whose request
headers are not complete within the timeout, at its start and between keep-alive requests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Optional

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.serve.app import create_app
from pneumoedge.serve.settings import ServeSettings

#: Largest request head (request line + headers) uvicorn's h11 parser buffers; httptools
#: (llhttp) has its own fixed limit. Far above any browser's or script's headers.
MAX_HEADER_BYTES = 32 * 1024


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol that closes a connection whose headers take over `timeout_s`."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._arm()  # the next request's headers get the same time

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app: Any, settings: ServeSettings) -> uvicorn.Config:
    """The server around `app`: no WebSocket, no access log, bounded connections and header time."""
    return uvicorn.Config(
        app,
        http=header_timeout_protocol(settings.header_timeout_s),
        ws="none",  # no route takes a WebSocket; upgrades are refused before reaching the app
        lifespan="on",
        log_config=None,  # our handlers; uvicorn's access log would record query strings
        access_log=False,
        server_header=False,
        proxy_headers=False,  # client addresses are never logged; nothing to trust a proxy for
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        # Open connections at once (the one being answered counts): more get uvicorn's 503.
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


def open_listener(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (port 0: any free one), bound before the server starts.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.listen(128)
    listener.set_inheritable(True)
    return listener


def serve_forever(ensemble: Ensemble, settings: ServeSettings, listener: socket.socket) -> None:
    """Serve `ensemble` on `listener` until Ctrl-C, logging request lines to standard error."""
    _configure_logging()
    config = uvicorn_config(create_app(ensemble, settings), settings)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass


def _configure_logging() -> None:
    """Request lines (ids, sizes, timings, statuses) to standard error at INFO, whatever --verbose says."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("pneumoedge.serve", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
