"""One ASGI layer around the app: host and origin checks, authentication, request ids, security headers, logs.

Logs carry a request id, the route, the status, byte counts and timings: never a file name,
a query string, a header value or anything read from an image (DICOM headers name patients).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, MutableMapping, Optional
from urllib.parse import urlsplit

from pneumoedge.serve.settings import HostPolicy

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

log = logging.getLogger("pneumoedge.serve.access")

#: Paths answered without a token: they say only whether the process is up and ready.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: Paths logged by name; anything else is logged as "other" (a path can carry a file name).
LOGGED_PATHS = frozenset({"/", "/favicon.ico", "/healthz", "/readyz", "/api/v1/predict", "/api/v1/model", "/api/v1/openapi.json"})

# Only this origin: the page's own script, style and API. Images may also be blob: (the
# thumbnails of the user's own files, made in the browser) and data: (heatmap overlays
# returned inline by the API). No inline script or style, no frames, no plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    # Results describe patients' images: no browser or proxy may keep them.
    (b"cache-control", b"no-store"),
)


#: Methods that change nothing: a browser's cross-site GET cannot read the answer (no CORS), so
#: only the other methods need the Origin check.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ServeMiddleware:
    """Wraps the FastAPI app; `token` None means no authentication (loopback or explicitly insecure).

    Every HTTP request must name one of `hosts` in its Host header (400 otherwise), and a
    browser's write (any method but GET/HEAD/OPTIONS carrying an Origin) must come from the
    page's own origin (403 otherwise). WebSocket connections are refused: the service has none.
    """

    def __init__(self, app: ASGIApp, token: Optional[str] = None, hosts: Optional[HostPolicy] = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.hosts = hosts or HostPolicy()

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            # No route takes a WebSocket (uvicorn is started with ws="none" too): refuse before
            # anything else sees it, so no future route could skip the checks below.
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        request_id = uuid.uuid4().hex[:12]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        counts = {"in": 0, "out": 0, "status": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                counts["in"] += len(message.get("body", b""))
            return message

        async def secured_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _REPLACED]
                message["headers"] = headers + list(SECURITY_HEADERS) + [(b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status, detail = refusal
                await _refuse(secured_send, status, detail)
            elif self.token is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                await _unauthorized(secured_send)
            else:
                await self.app(scope, counting_receive, secured_send)
        finally:
            path = scope["path"]
            route = path if path in LOGGED_PATHS else "/static/*" if path.startswith("/static/") else "other"
            log.info(
                "request=%s method=%s route=%s status=%s files=%s in_bytes=%d out_bytes=%d ms=%.1f",
                request_id,
                scope["method"],
                route,
                counts["status"] or state.get("outcome", "none"),
                state.get("files", 0),
                counts["in"],
                counts["out"],
                (time.perf_counter() - started) * 1000,
            )

    def _refusal(self, scope: Scope) -> Optional[tuple[int, str]]:
        """(status, reason) when the Host or the Origin is not this server's; None when both are."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host):
            return 400, "unknown Host header: this server answers only the names it was started for (serve --allowed-host)"
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS:
            netloc = urlsplit(origin.decode("latin-1")).netloc.lower() if origin != b"null" else ""
            if netloc != host.lower():  # same origin: the page this server served
                return 403, "cross-origin request refused: only this server's own page may send images"
        return None

    def _authorized(self, scope: Scope) -> bool:
        """A bearer token (API clients) or HTTP Basic with the token as password (the browser prompts)."""
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credential = value.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer":
            given = credential.strip()
        elif scheme == b"basic":
            try:
                given = base64.b64decode(credential.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        else:
            return False
        return hmac.compare_digest(given, self.token)  # constant time: no guessing by timing


_REPLACED = frozenset(name for name, _ in SECURITY_HEADERS)


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _unauthorized(send) -> None:
    body = json.dumps({"detail": "authentication required: send 'Authorization: Bearer TOKEN' (serve --token)"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # Browsers prompt for Basic (any user name, the token as password); scripts use Bearer.
                (b"www-authenticate", b'Basic realm="pneumoedge", charset="UTF-8"'),
                (b"www-authenticate", b'Bearer realm="pneumoedge"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
