"""Forwards a public request to the service that owns it, streaming both ways.

The service gets the caller's access token (an API key already exchanged), who the gateway
found the caller to be (`X-Account-Id`, `X-User-Id`, `X-User-Role`, `X-Token-Scope`: informative,
the services verify the token themselves), the request id and the client's address.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
from fastapi import Request
from starlette.responses import Response, StreamingResponse
from yarl import URL

from gateway.cache import Answer, ResponseCache
from gateway.domain import matches
from gateway.identity import Caller
from gateway.metrics import CACHE, UPSTREAM_LATENCY, UPSTREAM_REQUESTS
from gateway.routes import cache_scope
from gateway.upstreams import ConnectionDropped, Upstreams
from herald import logs
from herald.errors import ApiError

# Hop-by-hop headers (RFC 9110 §7.6.1), and those only the gateway may set.
_DROP_REQUEST = {
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "x-internal-token",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "x-account-id",
    "x-user-id",
    "x-user-role",
    "x-token-scope",
}
# Methods that change nothing: safe to send again when a connection fails under them.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Everything `quote` would otherwise encode that a request target may carry as it is.
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))
# Answers up to this size are read whole and sent with one write; larger ones stream.
_READ_AT_ONCE = 64 * 1024
# Bytes: the names aiohttp gives raw are compared lower-cased, without decoding each one.
_DROP_RESPONSE = {
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"server",
    b"date",
}


class _ClientBody:
    """The client's body as it streams to the service, and why it stopped if it failed.

    aiohttp writes a body in a task of its own and reports any failure as a connection error;
    a body too large (413) or a client gone must reach the client as what they are.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self.failure: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._request.stream():
                if chunk:
                    yield chunk
        except Exception as exc:
            self.failure = exc
            raise


def _request_headers(request: Request, caller: Caller | None) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in request.headers.items() if k not in _DROP_REQUEST]
    if caller is not None:
        principal = caller.principal
        headers += [
            ("authorization", f"Bearer {caller.access_token}"),
            ("x-account-id", str(principal.account_id)),
            ("x-user-id", str(principal.user_id)),
            ("x-user-role", principal.role),
            ("x-token-scope", principal.scope),
        ]
    elif "authorization" in request.headers:
        # Public paths (logout of a stale session, say) still pass a token on untouched.
        headers.append(("authorization", request.headers["authorization"]))
    # Decided by the edge middleware from GATEWAY_TRUSTED_PROXIES: its last entry is the client.
    headers.append(("x-forwarded-for", request.state.forwarded_for))
    headers.append(("x-forwarded-proto", request.url.scheme))
    headers.append(("x-request-id", logs.correlation_id.get() or logs.new_correlation_id()))
    return headers


def _response_headers(upstream: aiohttp.ClientResponse) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k, v) for k, v in upstream.headers.items() if k.lower().encode() not in _DROP_RESPONSE
    )


def _upstream_url(request: Request, base: str) -> URL:
    # The path and query as the client encoded them: decoding and re-encoding could change
    # their meaning.
    raw_path: bytes = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    query: bytes = request.scope["query_string"]
    target = raw_path + b"?" + query if query else raw_path
    if not target.isascii():
        # Octets beyond ASCII that a client sent unencoded go on percent-encoded: the same
        # octets to the service, in a request line every HTTP/1.1 parser takes.
        return URL(base + quote(target, safe=_PRINTABLE_ASCII), encoded=True)
    return URL(base + target.decode("ascii"), encoded=True)


def _error(exc: aiohttp.ClientError, service: str) -> ApiError:
    """The answer a client gets when `service` fails it: 503 unreachable, 504 gone quiet."""
    # Waiting for a connection (pooled or new) is the service being unreachable; a service that
    # took the request and then said nothing for too long has timed out.
    if isinstance(exc, aiohttp.ServerTimeoutError) and not isinstance(
        exc, aiohttp.ConnectionTimeoutError
    ):
        return ApiError(504, "upstream_timeout", f"the {service} service did not answer in time")
    return ApiError(503, "service_unavailable", f"the {service} service is unavailable")


async def _send(
    request: Request, upstreams: Upstreams, service: str, caller: Caller | None
) -> aiohttp.ClientResponse:
    url = _upstream_url(request, upstreams.urls[service])
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    body = _ClientBody(request) if has_body else None
    session = upstreams.sessions[service]
    headers = _request_headers(request, caller)
    # A pooled connection the service closed (a restart, its keep-alive ending) fails before
    # any answer: a request without a body that cannot change anything is sent once more, on
    # a new connection. Others are not: the service may have acted on them.
    retries = 1 if request.method in _IDEMPOTENT and not has_body else 0
    started = time.perf_counter()
    while True:
        try:
            upstream = await session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
            break
        except aiohttp.ClientError as exc:
            if body is not None and body.failure is not None:
                raise body.failure from None
            if isinstance(exc, ConnectionDropped) and retries > 0:
                retries -= 1
                UPSTREAM_REQUESTS.labels(service, "retried").inc()
                continue
            error = _error(exc, service)
            outcome = "timeout" if error.status == 504 else "unavailable"
            UPSTREAM_REQUESTS.labels(service, outcome).inc()
            raise error from None
    UPSTREAM_REQUESTS.labels(service, "answered").inc()
    UPSTREAM_LATENCY.labels(service).observe(time.perf_counter() - started)
    return upstream


async def _relay(upstream: aiohttp.ClientResponse, service: str) -> Response:
    """The service's answer to the client: small bodies read at once, larger ones streamed."""
    length = upstream.headers.get("content-length", "")
    response: Response
    if length.isdigit() and int(length) <= _READ_AT_ONCE:
        response = Response(await _read(upstream, service), status_code=upstream.status)
    else:
        response = StreamingResponse(_stream(upstream), status_code=upstream.status)
    # Raw pairs, not a mapping: repeated fields (Set-Cookie, Link) must all reach the client.
    response.raw_headers = [
        (name, value) for name, value in upstream.raw_headers if name.lower() not in _DROP_RESPONSE
    ]
    return response


async def _stream(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    # Released however the relay ends: a connection left half read is closed, not pooled.
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()


async def _read(upstream: aiohttp.ClientResponse, service: str) -> bytes:
    try:
        return await upstream.read()
    except aiohttp.ClientError as exc:
        raise _error(exc, service) from None
    finally:
        upstream.release()


def _no_cache(request: Request) -> bool:
    directives = request.headers.get("cache-control", "") + request.headers.get("pragma", "")
    return "no-cache" in directives.lower() or "no-store" in directives.lower()


def _from_cache(request: Request, answer: Answer, *, shared: bool, now: float) -> Response:
    age = max(0, math.ceil(answer.expires - now))
    validators = {
        "ETag": answer.etag,
        "Cache-Control": f"{'public' if shared else 'private'}, max-age={age}",
    }
    if not shared:
        validators["Vary"] = "Authorization"
    if matches(request.headers.get("if-none-match"), answer.etag):
        CACHE.labels("not_modified").inc()
        return Response(status_code=304, headers=validators)
    kept = {k: v for k, v in answer.headers if k.lower() not in ("cache-control", "etag", "vary")}
    return Response(answer.body, status_code=answer.status, headers=kept | validators)


async def forward(
    request: Request,
    upstreams: Upstreams,
    service: str,
    *,
    caller: Caller | None,
    cache: ResponseCache | None = None,
) -> Response:
    """Send `request` to `service` and relay its answer; 503/504 when it cannot."""
    shared = cache_scope(request.url.path) if request.method == "GET" else None
    if cache is None or shared is None or (not shared and caller is None):
        return await _relay(await _send(request, upstreams, service, caller), service)
    seconds = cache.seconds(shared=shared)
    if seconds <= 0:
        return await _relay(await _send(request, upstreams, service, caller), service)
    # Per account and per scope: a send-only API key must not read what a full-access caller of
    # the same account was answered (the service itself would refuse it with 403).
    owner = (
        "*"
        if shared or caller is None
        else f"{caller.principal.account_id}:{caller.principal.scope}"
    )
    key = (owner, request.url.path, request.url.query, request.headers.get("accept", ""))
    now = time.monotonic()
    if not _no_cache(request):
        kept = cache.get(key, now)
        if kept is not None:
            CACHE.labels("hit").inc()
            return _from_cache(request, kept, shared=shared, now=now)
    CACHE.labels("miss").inc()
    upstream = await _send(request, upstreams, service, caller)
    length = upstream.headers.get("content-length", "")
    cacheable = (
        upstream.status == 200
        and "content-encoding" not in upstream.headers
        and length.isdigit()
        and int(length) <= cache.max_body_bytes
    )
    if not cacheable:
        return await _relay(upstream, service)
    body = await _read(upstream, service)
    answer = cache.put(
        key,
        status=upstream.status,
        headers=_response_headers(upstream),
        body=body,
        expires=now + seconds,
    )
    return _from_cache(request, answer, shared=shared, now=now)
