"""The pixel and the click redirect: answered from memory, the event handed to the buffer.

A token is verified (HMAC, no database), the request's agent and address are judged, and the
event goes into the buffer; the database is never touched on this path. The two endpoints are
answered by a plain ASGI layer in front of the framework: its routing and dependency machinery
cost several times what the work itself does, on the busiest endpoints of the platform.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.links import ClickToken, LinkSigner, OpenToken
from herald.metrics import HTTP_LATENCY, HTTP_REQUESTS
from tracking.buffer import ActivityBuffer
from tracking.domain import Activity, normalize_message_id, redirect_target
from tracking.machine import BurstDetector, Classifier
from tracking.metrics import DROPPED, REJECTED_TOKENS

log = logging.getLogger(__name__)

# A transparent 1x1 GIF.
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


class HotPath:
    """What the pixel and click endpoints need, built once at start."""

    def __init__(
        self,
        *,
        signer: LinkSigner,
        classifier: Classifier,
        buffer: ActivityBuffer,
        detector: BurstDetector,
        forwarded_hops: int,
        full_wait: float,
    ) -> None:
        self._signer = signer
        self._classifier = classifier
        self.buffer = buffer
        self._detector = detector
        self._hops = forwarded_hops
        self._full_wait = full_wait
        self._last_drop_log = 0.0
        # Event ids: a random 64-bit prefix per process and a counter, unique without a
        # system call per request (they only have to tell a retried write from a new event).
        self._id_prefix = secrets.randbits(64) << 64
        self._counter = itertools.count()

    def _new_id(self) -> uuid.UUID:
        return uuid.UUID(int=self._id_prefix | next(self._counter))

    def client_ip(self, forwarded_for: str | None, peer: str | None) -> str | None:
        """The client's address: the entry our trusted proxies appended, else the peer."""
        if self._hops and forwarded_for:
            entries = [e.strip() for e in forwarded_for.split(",")]
            return entries[max(len(entries) - self._hops, 0)][:64] or peer
        return peer

    async def open(
        self, token: str, *, user_agent: str | None, ip: str | None, method: str
    ) -> bool:
        """Record an open; False for a token that is not a genuine open token."""
        parsed = self._signer.verify("open", token, OpenToken)
        if parsed is None:
            REJECTED_TOKENS.labels("open").inc()
            return False
        activity = Activity(
            id=self._new_id(),
            kind="open",
            source="herald",
            message_id=normalize_message_id(parsed.m),
            email_id=parsed.e,
            account_id=parsed.a,
            at=datetime.now(UTC),
            reason=self._classifier.open_reason(user_agent, ip, method),
            user_agent=user_agent[:1000] if user_agent else None,
            ip=ip,
        )
        await self._enqueue(activity)
        return True

    async def click(
        self, token: str, *, user_agent: str | None, ip: str | None, method: str
    ) -> str | None:
        """Record a click and return where to send the browser; None for a bad token."""
        parsed = self._signer.verify("click", token, ClickToken)
        target = redirect_target(parsed.u) if parsed is not None else None
        if parsed is None or target is None:
            REJECTED_TOKENS.labels("click").inc()
            return None
        at = time.time()
        message_id = normalize_message_id(parsed.m)
        self._detector.record(message_id, at, parsed.i)
        activity = Activity(
            id=self._new_id(),
            kind="click",
            source="herald",
            message_id=message_id,
            email_id=parsed.e,
            account_id=parsed.a,
            at=datetime.fromtimestamp(at, UTC),
            reason=self._classifier.click_reason(user_agent, method),
            user_agent=user_agent[:1000] if user_agent else None,
            ip=ip,
            link_index=parsed.i,
            url=parsed.u,
        )
        await self._enqueue(activity)
        return target

    async def _enqueue(self, activity: Activity) -> None:
        if await self.buffer.put(activity, wait=self._full_wait):
            return
        DROPPED.labels(activity.kind, "buffer_full").inc()
        now = time.monotonic()
        if now - self._last_drop_log > 10:
            self._last_drop_log = now
            log.error(
                "tracking buffer full: dropping answered opens and clicks",
                extra={"capacity": self.buffer.capacity},
            )


PIXEL_HEADERS = [
    (b"content-type", b"image/gif"),
    (b"content-length", str(len(PIXEL)).encode()),
    # Nothing on the way may keep the pixel: every open must reach us.
    (b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0, private"),
    (b"pragma", b"no-cache"),
    (b"expires", b"0"),
    (b"x-content-type-options", b"nosniff"),
]
# The token must not reach the destination site as the referrer.
REDIRECT_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-length", b"0"),
]
NOT_FOUND = b'{"error":{"code":"not_found","message":"link not found","details":[]}}'
NOT_FOUND_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(NOT_FOUND)).encode()),
    (b"cache-control", b"no-store"),
]
ROUTES = {"open": "/t/o/{token}", "click": "/t/c/{token}"}


class TrackingLinks:
    """ASGI middleware answering GET and HEAD on `/t/o/{token}` and `/t/c/{token}`; everything
    else goes on to the app. It counts in the same HTTP metrics as every other route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "HEAD")
            or not path.startswith(("/t/o/", "/t/c/"))
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        kind = "open" if path[3] == "o" else "click"
        hot: HotPath = scope["app"].state.runtime.extras["hotpath"]
        agent, forwarded = None, None
        for name, value in scope["headers"]:
            if name == b"user-agent":
                agent = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded = value.decode("latin-1")
        client = scope.get("client")
        ip = hot.client_ip(forwarded, client[0] if client else None)
        token, method = path[5:], scope["method"]
        status, headers, body = 404, NOT_FOUND_HEADERS, NOT_FOUND
        if kind == "open":
            if await hot.open(token, user_agent=agent, ip=ip, method=method):
                status, headers, body = 200, PIXEL_HEADERS, PIXEL
        else:
            target = await hot.click(token, user_agent=agent, ip=ip, method=method)
            if target is not None:
                location = (b"location", target.encode("latin-1"))
                status, headers, body = 302, [location, *REDIRECT_HEADERS], b""
        start: Message = {"type": "http.response.start", "status": status, "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": body})
        self._observe(method, ROUTES[kind], status, time.perf_counter() - started)

    def _observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._metrics.get(key)
        if children is None:
            children = self._metrics[key] = (
                HTTP_REQUESTS.labels(method, route, str(status)),
                HTTP_LATENCY.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)


# How the two endpoints appear in the service's OpenAPI document.
OPENAPI_PATHS: dict[str, Any] = {
    "/t/o/{token}": {
        "get": {
            "tags": ["tracking links"],
            "summary": "Open pixel",
            "description": "The open-tracking pixel in each mail: records the open and answers a"
            " transparent 1x1 GIF, never cached. A forged or altered token gets 404. Nothing is"
            " written to the database while the request waits.",
            "operationId": "open_pixel",
            "parameters": [
                {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "a transparent GIF", "content": {"image/gif": {}}},
                "404": {"description": "not a genuine open token"},
            },
        }
    },
    "/t/c/{token}": {
        "get": {
            "tags": ["tracking links"],
            "summary": "Follow a link",
            "description": "A rewritten link in a mail: records the click and redirects to the"
            " original URL, which travels inside the signed token, so there is no open redirect:"
            " a forged or altered token gets 404 and is never redirected, and only http(s)"
            " targets are followed.",
            "operationId": "follow_link",
            "parameters": [
                {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "302": {"description": "to the link's original URL"},
                "404": {"description": "not a genuine click token"},
            },
        }
    },
}
