"""Forwards a public request to the service that owns it, streaming both ways."""

from __future__ import annotations

import httpx
from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from gateway.api_keys import API_KEY_PREFIX, ApiKeyExchanger
from gateway.upstreams import Upstreams
from herald import logs
from herald.errors import ApiError
from herald.security import bearer_token

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy sets itself.
_DROP_REQUEST = {
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-internal-token",
    "x-forwarded-for",
    "x-request-id",
}
_DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "server",
    "date",
}


async def forward(
    request: Request, upstreams: Upstreams, service: str, api_keys: ApiKeyExchanger
) -> Response:
    """Send `request` to `service` and relay its answer; 503/504 when it cannot."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
    token = bearer_token(request)
    if token is not None and token.startswith(API_KEY_PREFIX):
        access = await api_keys.access_token(token)
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        headers.append(("authorization", f"Bearer {access}"))
    client = request.client.host if request.client else "unknown"
    forwarded_for = request.headers.get("x-forwarded-for")
    headers.append(("x-forwarded-for", f"{forwarded_for}, {client}" if forwarded_for else client))
    headers.append(("x-request-id", logs.correlation_id.get() or logs.new_correlation_id()))
    url = httpx.URL(
        upstreams.urls[service] + request.url.path, query=request.url.query.encode("latin-1")
    )
    upstream_request = upstreams.client.build_request(
        request.method, url, headers=headers, content=request.stream()
    )
    try:
        upstream = await upstreams.client.send(upstream_request, stream=True)
    except httpx.TimeoutException:
        raise ApiError(
            504, "upstream_timeout", f"the {service} service did not answer in time"
        ) from None
    except httpx.TransportError:
        raise ApiError(
            503, "service_unavailable", f"the {service} service is unavailable"
        ) from None
    response_headers = {
        k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
    }
    return StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        headers=response_headers,
        background=BackgroundTask(upstream.aclose),
    )
