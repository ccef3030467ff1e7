"""The pooled HTTP clients the gateway reaches the services with, and their readiness.

Forwarding (and the API-key exchange on a request's path) goes through aiohttp: its C parser
and lean pool cost a fifth of what httpx/httpcore cost per hop, the bulk of the gateway's CPU.
The gateway's own few calls (readiness, statistics, API documents) keep an httpx client.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx

from gateway.api_keys import ApiKeyExchanger
from herald.health import Check
from herald.security import internal_headers
from herald.service import Runtime, Worker

# Idle pooled connections are dropped before the services' servers close them (uvicorn: after
# 5 s), so a request is seldom written into a connection the other end is closing.
KEEPALIVE_SECONDS = 3.0
# Headers aiohttp would add on its own: the service must see what the client sent, no more
# (an added Accept-Encoding, say, would have it compress for a client that cannot decode).
_NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class ConnectionDropped(aiohttp.ClientConnectionError):
    """The connection failed before any answer: refused, reset, or closed before the status."""


async def _no_silent_resend(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    # aiohttp sends PUT and DELETE again on a dropped connection too; whether to resend is the
    # proxy's decision (it may only for requests that change nothing), so it sees the failure.
    try:
        return await handler(request)
    except aiohttp.ClientSSLError:
        raise
    except (
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientOSError,
        aiohttp.ClientConnectionResetError,
    ) as exc:
        raise ConnectionDropped(str(exc)) from exc


def _forwarding_session(timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=KEEPALIVE_SECONDS),
        # No deadline on the whole exchange (a large body may take long), but on each wait:
        # for a pooled or new connection, for its TCP handshake, and for each read.
        timeout=aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=2.0, sock_read=timeout
        ),
        # Bodies pass through as the service encoded them.
        auto_decompress=False,
        # The services' cookies are the client's to keep, not the gateway's.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NOT_ADDED,
        middlewares=(_no_silent_resend,),
    )


class Upstreams:
    """A pooled session per service for forwarding, an httpx client for the gateway's own calls.

    A pool per service keeps a slow service from taking the connections the others need.
    """

    def __init__(self, urls: dict[str, str], *, timeout: float) -> None:
        self.urls = urls
        self.sessions = {service: _forwarding_session(timeout) for service in urls}
        # Health, statistics and API documents: few calls, short timeouts of their own.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=2.0),
            limits=httpx.Limits(
                max_connections=20, max_keepalive_connections=4, keepalive_expiry=KEEPALIVE_SECONDS
            ),
        )

    async def aclose(self) -> None:
        """Close every pool."""
        for session in self.sessions.values():
            await session.close()
        await self.client.aclose()

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
    """Opens the upstream clients for the life of the gateway; the gateway is ready when all are."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        upstreams = Upstreams(urls, timeout=timeout)
        runtime.extras["upstreams"] = upstreams
        runtime.extras["api_keys"] = ApiKeyExchanger(
            session=upstreams.sessions["auth"],
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
