"""Forwards a public request to the service that owns it, streaming both ways.

The service gets the caller's access token (an API key already exchanged), who the gateway
found the caller to be (`X-Account-Id`, `X-User-Id`, `X-User-Role`, `X-Token-Scope`: informative,
the services verify the token themselves), the request id and the client's address.
"""

from __future__ import annotations

import math
import time

import httpx
from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from gateway.cache import Answer, ResponseCache
from gateway.domain import matches
from gateway.identity import Caller
from gateway.metrics import CACHE, UPSTREAM_LATENCY, UPSTREAM_REQUESTS
from gateway.routes import cache_scope
from gateway.upstreams import Upstreams
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
# Failures that leave no answer at all: refused, reset, or closed before the status line.
_STALE_CONNECTION = (
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
# Answers up to this size are read whole and sent with one write; larger ones stream.
_READ_AT_ONCE = 64 * 1024
_DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "server",
    "date",
}


def _request_headers(request: Request, caller: Caller | None) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
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


def _response_headers(upstream: httpx.Response) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k, v) for k, v in upstream.headers.multi_items() if k.lower() not in _DROP_RESPONSE
    )


def _unavailable(service: str) -> ApiError:
    """Counted, and the 503 a client gets when a service cannot be reached."""
    UPSTREAM_REQUESTS.labels(service, "unavailable").inc()
    return ApiError(503, "service_unavailable", f"the {service} service is unavailable")


async def _send(
    request: Request, upstreams: Upstreams, service: str, caller: Caller | None
) -> httpx.Response:
    # The path as the client encoded it: decoding and re-encoding could change its meaning.
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    url = httpx.URL(upstreams.urls[service] + path, query=request.url.query.encode("latin-1"))
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    client = upstreams.clients[service]
    transport = upstreams.transports[service]
    headers = _request_headers(request, caller)
    # A pooled connection the service closed (a restart, its keep-alive ending) fails before
    # any answer: a request without a body that cannot change anything is sent once more, on
    # a new connection. Others are not: the service may have acted on them.
    retries = 1 if request.method in _IDEMPOTENT and not has_body else 0
    started = time.perf_counter()
    while True:
        upstream_request = client.build_request(
            request.method, url, headers=headers, content=request.stream() if has_body else None
        )
        try:
            upstream = await transport.handle_async_request(upstream_request)
            break
        except _STALE_CONNECTION:
            if retries > 0:
                retries -= 1
                UPSTREAM_REQUESTS.labels(service, "retried").inc()
                continue
            raise _unavailable(service) from None
        except httpx.ConnectTimeout:
            raise _unavailable(service) from None
        except httpx.TimeoutException:
            UPSTREAM_REQUESTS.labels(service, "timeout").inc()
            raise ApiError(
                504, "upstream_timeout", f"the {service} service did not answer in time"
            ) from None
        except httpx.TransportError:
            raise _unavailable(service) from None
    UPSTREAM_REQUESTS.labels(service, "answered").inc()
    UPSTREAM_LATENCY.labels(service).observe(time.perf_counter() - started)
    return upstream


async def _relay(upstream: httpx.Response, service: str) -> Response:
    """The service's answer to the client: small bodies read at once, larger ones streamed."""
    length = upstream.headers.get("content-length", "")
    response: Response
    if length.isdigit() and int(length) <= _READ_AT_ONCE:
        body = await _read(upstream, service)
        response = Response(body, status_code=upstream.status_code)
    else:
        response = StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
    # Raw pairs, not a mapping: repeated fields (Set-Cookie, Link) must all reach the client.
    response.raw_headers = [
        (name, value)
        for name, value in upstream.headers.raw
        if name.lower().decode("latin-1") not in _DROP_RESPONSE
    ]
    return response


async def _read(upstream: httpx.Response, service: str) -> bytes:
    try:
        return b"".join([chunk async for chunk in upstream.aiter_raw()])
    except httpx.TimeoutException:
        raise ApiError(
            504, "upstream_timeout", f"the {service} service did not answer in time"
        ) from None
    except httpx.TransportError:
        raise ApiError(
            503, "service_unavailable", f"the {service} service is unavailable"
        ) from None
    finally:
        await upstream.aclose()


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
        upstream.status_code == 200
        and "content-encoding" not in upstream.headers
        and length.isdigit()
        and int(length) <= cache.max_body_bytes
    )
    if not cacheable:
        return await _relay(upstream, service)
    body = await _read(upstream, service)
    answer = cache.put(
        key,
        status=upstream.status_code,
        headers=_response_headers(upstream),
        body=body,
        expires=now + seconds,
    )
    return _from_cache(request, answer, shared=shared, now=now)
