"""What the gateway does to every request and answer before routing: the edge policies.

The client's address is decided first, from `X-Forwarded-For` only where the peer is one of
`GATEWAY_TRUSTED_PROXIES` (`domain.forwarded_chain`): the rate limit, the logs and the services
(the forwarded chain's last entry) all see that one address.
Per client address, a token bucket (`429` with `Retry-After` and `RateLimit-*`); bodies bounded
(`413`, by `Content-Length` at once or while a chunked body streams); security headers on every
answer (HSTS over HTTPS, `nosniff`, `Referrer-Policy`, a default CSP on any HTML page that has
none). Health and metrics endpoints are exempt from the rate limit: probes and scrapers must
always get through.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.domain import Network, Quota, RateLimiter, forwarded_chain
from gateway.metrics import REJECTED
from gateway.routes import is_upload
from herald.errors import ApiError, FieldError, error_json

# For HTML the services forgot to protect: nothing runs, nothing loads from elsewhere.
DEFAULT_PAGE_CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_EXEMPT = ("/healthz", "/readyz", "/metrics")


class BodyTooLarge(ApiError):
    """A request body grew past the limit while streaming."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"the request body is larger than {limit} bytes")


class EdgeMiddleware:
    """Rate limit per client address, body size limits and security headers."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        ip_limiter: RateLimiter,
        trusted_proxies: list[Network],
        max_body_bytes: int,
        max_upload_bytes: int,
        hsts_max_age: int,
    ) -> None:
        self.app = app
        self.ip_limiter = ip_limiter
        self.trusted_proxies = trusted_proxies
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.hsts = f"max-age={hsts_max_age}" if hsts_max_age else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        https = scope.get("scheme") == "https"

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._secure(MutableHeaders(scope=message), https, state.get("quota"))
            await send(message)

        # The client's address, decided once: the rate limit, the logs and the services all
        # see the same one (`scope["client"]`, and the chain the proxy forwards).
        peer = scope.get("client")
        chain = forwarded_chain(
            _forwarded_for(scope),
            peer[0] if peer else "unknown",
            self.trusted_proxies,
        )
        scope["client"] = (chain[-1], peer[1] if peer else 0)
        state["forwarded_for"] = ", ".join(chain)

        path: str = scope["path"]
        if self.ip_limiter.enabled and path not in _EXEMPT:
            quota = self.ip_limiter.take(chain[-1], time.monotonic())
            state["quota"] = quota
            if not quota.allowed:
                REJECTED.labels("ip_rate_limited").inc()
                refusal = error_json(429, "rate_limited", "too many requests from this address")
                await refusal(scope, receive, send_secured)
                return

        undecodable = [
            name
            for name, raw in (
                ("path", scope.get("raw_path") or b""),
                ("query", scope["query_string"]),
            )
            if not _utf8(raw)
        ]
        if undecodable:
            # The services would read such bytes as U+FFFD and answer as if something else
            # had been asked.
            REJECTED.labels("bad_request").inc()
            refusal = error_json(
                400,
                "bad_request",
                f"the {undecodable[0]} is not valid UTF-8 once percent-decoded",
                [FieldError(field=name, message="not valid UTF-8") for name in undecodable],
            )
            await refusal(scope, receive, send_secured)
            return

        limit = self.max_upload_bytes if is_upload(path) else self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status, code, message = (
                (413, "payload_too_large", f"the request body is larger than {limit} bytes")
                if declared.isdigit()
                else (400, "bad_request", "Content-Length must be a number of bytes")
            )
            REJECTED.labels(code).inc()
            await error_json(status, code, message)(scope, receive, send_secured)
            return
        await self.app(scope, _bounded(receive, limit), send_secured)

    def _secure(self, headers: MutableHeaders, https: bool, quota: Quota | None) -> None:
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        if https and self.hsts:
            headers.setdefault("Strict-Transport-Security", self.hsts)
        if headers.get("content-type", "").startswith("text/html"):
            headers.setdefault("Content-Security-Policy", DEFAULT_PAGE_CSP)
        if quota is not None:
            for name, value in quota.headers().items():
                headers.setdefault(name, value)


def _utf8(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return None


def _forwarded_for(scope: Scope) -> str | None:
    # A proxy may add its own header line rather than extend the last: read them all, in order.
    values = [bytes(v).decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
    return ", ".join(values) if values else None


def _bounded(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def receive_bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                REJECTED.labels("payload_too_large").inc()
                raise BodyTooLarge(limit)
        return message

    return receive_bounded


class JsonCorsMiddleware(CORSMiddleware):
    """Starlette's CORS handling, answering a refused preflight in the one JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        REJECTED.labels("cors_refused").inc()
        kept = {
            k: v
            for k, v in response.headers.items()
            if k.lower().startswith("access-control-") or k.lower() == "vary"
        }
        return error_json(400, "cors_refused", bytes(response.body).decode(), headers=kept)
