"""One ASGI layer around the app: request ids, authentication, security headers, privacy-safe logs.

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


class ServeMiddleware:
    """Wraps the FastAPI app; `token` None means no authentication (loopback or explicitly insecure)."""

    def __init__(self, app: ASGIApp, token: Optional[str] = None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
            if self.token is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
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
