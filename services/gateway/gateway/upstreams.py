"""The pooled HTTP client the gateway reaches the services with, and their readiness."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from gateway.api_keys import ApiKeyExchanger
from herald.health import Check
from herald.security import internal_headers
from herald.service import Runtime, Worker


class Upstreams:
    """One pooled client for all services; each call bounded by timeouts."""

    def __init__(self, urls: dict[str, str], *, timeout: float) -> None:
        self.urls = urls
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=2.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

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
            client=upstreams.client,
            auth_url=urls["auth"],
            headers=internal_headers(runtime.settings),
            max_age=api_key_cache_seconds,
        )
        for service in urls:
            runtime.checks[service] = upstreams.readiness_check(service)
        try:
            yield
        finally:
            await upstreams.client.aclose()

    return worker
