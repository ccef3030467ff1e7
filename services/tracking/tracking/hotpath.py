"""The pixel and the click redirect: answered from memory, the event handed to the buffer.

A token is verified (HMAC, no database), the request's agent and address are judged, and the
event goes into the buffer; the database is never touched on this path. The two endpoints are
answered before FastAPI sees the request (`TrackingApp`): its per-request machinery (telemetry
checks, body limits, error middleware, routing, dependencies) costs several times what the work
itself does, on the busiest endpoints of the platform.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from herald.links import Purpose, parse_keys
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

_OPEN_FIELDS = frozenset({"m", "e", "a"})
_CLICK_FIELDS = frozenset({"m", "e", "a", "i", "u"})


class TokenReader:
    """Reads open and click tokens exactly as `herald.links.LinkSigner.verify` does, for less.

    The HMAC state after each key and purpose is kept and copied per token (no re-keying), and
    the payload's few fields are checked by hand instead of through a pydantic model. Account and
    email ids repeat across a campaign's opens, so their parsed UUIDs are remembered (bounded).
    A test holds it to LinkSigner's answers.
    """

    def __init__(self, spec: str) -> None:
        keys = parse_keys(spec)
        self._macs = {
            (kid, purpose): hmac.new(secret, f"{purpose}.".encode(), hashlib.sha256)
            for kid, secret in keys.items()
            for purpose in ("open", "click")
        }
        self._uuids: dict[str, uuid.UUID] = {}

    def _payload(self, purpose: Purpose, text: str, names: frozenset[str]) -> dict[str, Any] | None:
        if len(text) > 4096 or not text.isascii():
            return None
        parts = text.split(".")
        if len(parts) != 3:
            return None
        payload, kid, mac = parts
        keyed = self._macs.get((kid, purpose))
        if keyed is None:
            return None
        digest = keyed.copy()
        digest.update(payload.encode())
        expected = base64.urlsafe_b64encode(digest.digest()[:16]).rstrip(b"=")
        if not hmac.compare_digest(mac.encode(), expected):
            return None
        try:
            fields = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return None
        if not isinstance(fields, dict) or fields.keys() != names:
            return None
        return fields

    def _uuid(self, value: object) -> uuid.UUID:
        if not isinstance(value, str):
            raise ValueError("not a UUID")
        parsed = self._uuids.get(value)
        if parsed is None:
            parsed = uuid.UUID(value)
            if len(self._uuids) >= 10_000:
                self._uuids.clear()
            self._uuids[value] = parsed
        return parsed

    def open(self, text: str) -> tuple[str, uuid.UUID, uuid.UUID] | None:
        """(message id, email id, account id) of a genuine open token; None otherwise."""
        fields = self._payload("open", text, _OPEN_FIELDS)
        if fields is None or not isinstance(fields["m"], str):
            return None
        try:
            return fields["m"], self._uuid(fields["e"]), self._uuid(fields["a"])
        except ValueError:
            return None

    def click(self, text: str) -> tuple[str, uuid.UUID, uuid.UUID, int, str] | None:
        """(message id, email id, account id, link index, URL) of a genuine click token."""
        fields = self._payload("click", text, _CLICK_FIELDS)
        if fields is None:
            return None
        message, index, url = fields["m"], fields["i"], fields["u"]
        if not (isinstance(message, str) and isinstance(url, str)):
            return None
        if not isinstance(index, int) or isinstance(index, bool):
            return None
        try:
            return message, self._uuid(fields["e"]), self._uuid(fields["a"]), index, url
        except ValueError:
            return None


class HotPath:
    """What the pixel and click endpoints need, built once at start."""

    def __init__(
        self,
        *,
        tokens: TokenReader,
        classifier: Classifier,
        buffer: ActivityBuffer,
        detector: BurstDetector,
        forwarded_hops: int,
        full_wait: float,
    ) -> None:
        self._tokens = tokens
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
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

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
        parsed = self._tokens.open(token)
        if parsed is None:
            REJECTED_TOKENS.labels("open").inc()
            return False
        message_id, email_id, account_id = parsed
        activity = Activity(
            id=self._new_id(),
            kind="open",
            source="herald",
            message_id=normalize_message_id(message_id),
            email_id=email_id,
            account_id=account_id,
            at=datetime.now(UTC),
            reason=self._classifier.open_reason(user_agent, ip, method),
            user_agent=user_agent[:1000] if user_agent else None,
            ip=ip,
        )
        if not self.buffer.offer(activity):
            await self._enqueue_when_full(activity)
        return True

    async def click(
        self, token: str, *, user_agent: str | None, ip: str | None, method: str
    ) -> str | None:
        """Record a click and return where to send the browser; None for a bad token."""
        parsed = self._tokens.click(token)
        target = redirect_target(parsed[4]) if parsed is not None else None
        if parsed is None or target is None:
            REJECTED_TOKENS.labels("click").inc()
            return None
        raw_message_id, email_id, account_id, link_index, url = parsed
        at = time.time()
        message_id = normalize_message_id(raw_message_id)
        self._detector.record(message_id, at, link_index)
        activity = Activity(
            id=self._new_id(),
            kind="click",
            source="herald",
            message_id=message_id,
            email_id=email_id,
            account_id=account_id,
            at=datetime.fromtimestamp(at, UTC),
            reason=self._classifier.click_reason(user_agent, method),
            user_agent=user_agent[:1000] if user_agent else None,
            ip=ip,
            link_index=link_index,
            url=url,
        )
        if not self.buffer.offer(activity):
            await self._enqueue_when_full(activity)
        return target

    async def _enqueue_when_full(self, activity: Activity) -> None:
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

    async def answer(self, scope: Scope, send: Send) -> None:
        """Answer a GET or HEAD of `/t/o/{token}` or `/t/c/{token}`, counted in the same HTTP
        metrics as every other route."""
        started = time.perf_counter()
        path: str = scope["path"]
        agent, forwarded = None, None
        for name, value in scope["headers"]:
            if name == b"user-agent":
                agent = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded = value.decode("latin-1")
        client = scope.get("client")
        ip = self.client_ip(forwarded, client[0] if client else None)
        token, method = path[5:], scope["method"]
        if path[3] == "o":
            route = ROUTES["open"]
            if await self.open(token, user_agent=agent, ip=ip, method=method):
                await send(PIXEL_START)
                await send(PIXEL_BODY)
                self._observe(method, route, 200, started)
                return
        else:
            route = ROUTES["click"]
            target = await self.click(token, user_agent=agent, ip=ip, method=method)
            if target is not None:
                location = (b"location", target.encode("latin-1"))
                start: Message = {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [location, *REDIRECT_HEADERS],
                }
                await send(start)
                await send(EMPTY_BODY)
                self._observe(method, route, 302, started)
                return
        await send(NOT_FOUND_START)
        await send(NOT_FOUND_BODY)
        self._observe(method, route, 404, started)

    def _observe(self, method: str, route: str, status: int, started: float) -> None:
        key = (method, route, status)
        children = self._metrics.get(key)
        if children is None:
            children = self._metrics[key] = (
                HTTP_REQUESTS.labels(method, route, str(status)),
                HTTP_LATENCY.labels(method, route),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


# The answers, built once (nothing on the way changes them: no middleware sees these requests).
PIXEL_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"image/gif"),
        (b"content-length", str(len(PIXEL)).encode()),
        # Nothing on the way may keep the pixel: every open must reach us.
        (b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0, private"),
        (b"pragma", b"no-cache"),
        (b"expires", b"0"),
        (b"x-content-type-options", b"nosniff"),
    ],
}
PIXEL_BODY: Message = {"type": "http.response.body", "body": PIXEL}
# The token must not reach the destination site as the referrer.
REDIRECT_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-length", b"0"),
]
EMPTY_BODY: Message = {"type": "http.response.body", "body": b""}
NOT_FOUND = b'{"error":{"code":"not_found","message":"link not found","details":[]}}'
NOT_FOUND_START: Message = {
    "type": "http.response.start",
    "status": 404,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(NOT_FOUND)).encode()),
        (b"cache-control", b"no-store"),
    ],
}
NOT_FOUND_BODY: Message = {"type": "http.response.body", "body": NOT_FOUND}
ROUTES = {"open": "/t/o/{token}", "click": "/t/c/{token}"}


class TrackingApp(FastAPI):
    """The service's FastAPI app, with GET and HEAD on `/t/o/…` and `/t/c/…` answered before
    FastAPI and its middleware see them; everything else goes on as usual."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(("/t/o/", "/t/c/"))
            and scope["method"] in ("GET", "HEAD")
        ):
            hot: HotPath = self.state.runtime.extras["hotpath"]
            await hot.answer(scope, send)
            return
        await super().__call__(scope, receive, send)


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
