"""The pooled HTTP client the gateway reaches the services with, and their readiness."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from gateway.api_keys import ApiKeyExchanger
from herald.health import Check
from herald.security import internal_headers
from herald.service import Runtime, Worker

# Idle pooled connections are dropped before the services' servers close them (uvicorn: after
# 5 s), so a request is seldom written into a connection the other end is closing.
KEEPALIVE_SECONDS = 3.0


class Upstreams:
    """A pooled client per service for forwarding, one more for the gateway's own calls.

    A pool per service keeps a slow service from taking the connections the others need, and
    keeps each pool small: httpcore looks at every pooled connection on every request.
    """

    def __init__(self, urls: dict[str, str], *, timeout: float) -> None:
        self.urls = urls
        # Forwarding sends through the transport itself: the client around it would keep the
        # services' cookies in a jar (work on every answer, and nothing the gateway may keep).
        self.transports = {
            service: httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=100,
                    max_keepalive_connections=16,
                    keepalive_expiry=KEEPALIVE_SECONDS,
                )
            )
            for service in urls
        }
        # Requests are built by (and the gateway's own calls made with) a client on that pool.
        self.clients = {
            service: httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=2.0), transport=transport
            )
            for service, transport in self.transports.items()
        }
        # Health, statistics and API documents: few calls, short timeouts of their own.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=2.0),
            limits=httpx.Limits(
                max_connections=20, max_keepalive_connections=4, keepalive_expiry=KEEPALIVE_SECONDS
            ),
        )

    async def aclose(self) -> None:
        """Close every pool."""
        for client in [*self.clients.values(), self.client]:
            await client.aclose()

    def readiness_check(self, service: str) -> Check:
        """A check that passes while `service` says it is ready."""
        url = f"{self.urls[service]}/readyz"

        async def check() -> bool:
            try:
                response = await self.client.get(url, timeout=2.0)
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        return check


def upstreams_worker(
    urls: dict[str, str], *, timeout: float, api_key_cache_seconds: float
) -> Worker:
    """Opens the upstream client for the life of the gateway; the gateway is ready when all are."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        upstreams = Upstreams(urls, timeout=timeout)
        runtime.extras["upstreams"] = upstreams
        runtime.extras["api_keys"] = ApiKeyExchanger(
            client=upstreams.clients["auth"],
            auth_url=urls["auth"],
            headers=internal_headers(runtime.settings),
            max_age=api_key_cache_seconds,
        )
        for service in urls:
            runtime.checks[service] = upstreams.readiness_check(service)
        try:
            yield
        finally:
            await upstreams.aclose()

    return worker
