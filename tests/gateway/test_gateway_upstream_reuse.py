"""A pooled connection the service closes under a request: a GET is sent again, a POST is not.

The stand-in service answers the first request of every connection and closes the connection
on the second without answering: what a service does when it restarts, or when its keep-alive
timer ends just as the gateway reuses the connection. Deterministic, unlike racing a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from herald.devinfra.process import free_port
from herald.devinfra.stack import ServiceProcess, Stack
from tests.conftest import TokenMaker


@dataclass
class Closer:
    """Counts connections and requests; closes each connection at its second request."""

    port: int
    connections: int = 0
    answered: int = 0
    dropped: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for request_no in (1, 2):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if request_no == 2:
                    self.dropped += 1
                    return
                self.answered += 1
                body = json.dumps({"connection": self.connections}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@dataclass
class ReuseGateway:
    url: str
    closer: Closer


@pytest.fixture(scope="module")
async def reuse_gateway(platform: Stack) -> AsyncIterator[ReuseGateway]:
    closer = Closer(free_port())
    server = await asyncio.start_server(closer.serve, "127.0.0.1", closer.port)
    port = free_port()
    env = platform.service_env("gateway") | {
        "GATEWAY_PORT": str(port),
        "GATEWAY_TLS_PORT": str(free_port()),
        "CAMPAIGN_URL": f"http://127.0.0.1:{closer.port}",
    }
    process = ServiceProcess("gateway", env, platform.logs_dir / "reuse-gateway.log", None)
    await process.start()
    gateway = ReuseGateway(f"http://127.0.0.1:{port}", closer)
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            while True:
                assert process.alive, f"see {platform.logs_dir}/reuse-gateway.log"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the gateway did not come up"
                await asyncio.sleep(0.2)
        yield gateway
    finally:
        await process.stop()
        server.close()
        await server.wait_closed()


async def test_a_get_on_a_connection_the_service_closed_is_sent_again(
    reuse_gateway: ReuseGateway, mint_token: TokenMaker
):
    headers = {"Authorization": f"Bearer {mint_token()}"}
    closer = reuse_gateway.closer
    async with httpx.AsyncClient(base_url=reuse_gateway.url, timeout=10) as client:
        first = await client.get("/emails", headers=headers)
        assert first.status_code == 200, first.text
        dropped = closer.dropped
        # Reuses the pooled connection, which the service closes: answered on a new one.
        second = await client.get("/emails", headers=headers)
        assert second.status_code == 200, second.text
        assert closer.dropped == dropped + 1
        assert second.json()["connection"] > first.json()["connection"]


async def test_a_post_on_a_connection_the_service_closed_is_not_sent_again(
    reuse_gateway: ReuseGateway, mint_token: TokenMaker
):
    headers = {"Authorization": f"Bearer {mint_token()}"}
    closer = reuse_gateway.closer
    async with httpx.AsyncClient(base_url=reuse_gateway.url, timeout=10) as client:
        warm = await client.get("/emails", headers=headers)
        assert warm.status_code == 200, warm.text
        answered = closer.answered
        # The service may have acted on it before closing: the caller decides, told 503.
        refused = await client.post("/compose", json={"subject": "once"}, headers=headers)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert closer.answered == answered


async def test_a_delete_on_a_connection_the_service_closed_is_not_sent_again(
    reuse_gateway: ReuseGateway, mint_token: TokenMaker
):
    # Idempotent by RFC 9110, so HTTP clients resend it; the service may still have acted.
    headers = {"Authorization": f"Bearer {mint_token()}"}
    closer = reuse_gateway.closer
    async with httpx.AsyncClient(base_url=reuse_gateway.url, timeout=10) as client:
        warm = await client.get("/emails", headers=headers)
        assert warm.status_code == 200, warm.text
        answered, dropped = closer.answered, closer.dropped
        refused = await client.delete("/emails/e1", headers=headers)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert (closer.answered, closer.dropped) == (answered, dropped + 1)
