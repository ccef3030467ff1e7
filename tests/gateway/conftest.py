"""Fixtures of the gateway tests: real accounts, and a gateway of their own with other settings."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from herald.devinfra.process import free_port
from herald.devinfra.stack import ServiceProcess, Stack
from herald.devinfra.tls import development_certificate
from herald.events.requests import SendRequested

PASSWORD = "gateway-orbit-candle-92-harbor"
# Larger than what the gateway reads at once (64 KiB), so that it streams.
LARGE_BODY = bytes(range(256)) * 1024
Requests = Callable[..., Awaitable[list[SendRequested]]]


@dataclass
class Account:
    """A signed-up, confirmed, logged-in user."""

    user_id: str
    email: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def new_account(gateway: httpx.AsyncClient, sent_requests: Requests) -> Account:
    """Sign up, confirm from the mailed link, log in: what a new user does."""
    tag = uuid.uuid4().hex[:10]
    email = f"gw{tag}@example.com"
    response = await gateway.post(
        "/signup", json={"username": f"gw{tag}", "email": email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    user_id = response.json()["id"]
    [mail] = await sent_requests(email)
    assert mail.text is not None
    link = next(word for word in mail.text.split() if "/signup/confirm" in word)
    token = parse_qs(urlparse(link).query)["token"][0]
    confirmed = await gateway.get("/signup/confirm", params={"token": token})
    assert confirmed.status_code == 200, confirmed.text
    tokens = await gateway.post("/login", json={"email": email, "password": PASSWORD})
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    return Account(user_id, email, body["access_token"], body["refresh_token"])


@pytest.fixture
async def account(gateway: httpx.AsyncClient, sent_requests: Requests) -> Account:
    return await new_account(gateway, sent_requests)


class Upstream:
    """A stand-in service the test gateway forwards to: it says what it received."""

    def __init__(self) -> None:
        self.reports_served = 0
        self.port = free_port()

    def app(self) -> Starlette:
        async def echo(request: Request) -> Response:
            body = await request.body()
            if request.url.path == "/contacts/slow":
                await asyncio.sleep(5)
            return JSONResponse(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "raw_path": request.scope["raw_path"].decode("latin-1"),
                    "query": request.url.query,
                    "headers": dict(request.headers),
                    "body_bytes": len(body),
                }
            )

        async def reports(request: Request) -> Response:
            self.reports_served += 1
            body = json.dumps({"served": self.reports_served, "query": request.url.query})
            return Response(body, media_type="application/json")

        async def large(request: Request) -> Response:
            # `?as=length|chunked|gzip`: a large answer with repeated fields the client must get.
            shape = request.query_params.get("as")
            response: Response
            if shape == "chunked":

                async def chunks() -> AsyncIterator[bytes]:
                    for start in range(0, len(LARGE_BODY), 10_000):
                        yield LARGE_BODY[start : start + 10_000]
                        await asyncio.sleep(0)

                response = StreamingResponse(chunks(), media_type="application/octet-stream")
            elif shape == "gzip":
                response = Response(
                    gzip.compress(LARGE_BODY),
                    media_type="application/octet-stream",
                    headers={"Content-Encoding": "gzip"},
                )
            else:
                response = Response(LARGE_BODY, media_type="application/octet-stream")
            response.raw_headers += [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
            return response

        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        return Starlette(
            routes=[
                Route("/reports", reports),
                Route("/contacts/large", large),
                Route("/{path:path}", echo, methods=methods),
            ]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class EdgeGateway:
    """A second gateway over the test platform: HTTPS, CORS, small limits, a stand-in upstream."""

    http_url: str
    https_url: str
    ca_file: Path
    upstream: Upstream
    process: ServiceProcess

    def client(self, *, secure: bool = False, **options: Any) -> httpx.AsyncClient:
        if secure:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            return httpx.AsyncClient(base_url=self.https_url, verify=context, timeout=30, **options)
        return httpx.AsyncClient(base_url=self.http_url, timeout=30, **options)


EDGE_SETTINGS = {
    "CORS_ORIGINS": "https://app.example",
    "RATE_LIMIT_IP_PER_SECOND": "0.5",
    "RATE_LIMIT_IP_BURST": "6",
    "RATE_LIMIT_ACCOUNT_PER_SECOND": "0.5",
    "RATE_LIMIT_ACCOUNT_BURST": "4",
    "MAX_BODY_BYTES": "4096",
    "MAX_UPLOAD_BYTES": "65536",
    "UPSTREAM_TIMEOUT": "1",
    "REPORTS_CACHE_SECONDS": "30",
    # Loopback (the tests, as a load balancer would) and an inner proxy network.
    "GATEWAY_TRUSTED_PROXIES": "127.0.0.1,::1,10.250.0.0/16",
}


@pytest.fixture(scope="module")
async def edge_gateway(
    platform: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EdgeGateway]:
    upstream = Upstream()
    server = uvicorn.Server(
        uvicorn.Config(
            upstream.app(),
            port=upstream.port,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
        )
    )
    serving = asyncio.create_task(server.serve())
    directory = tmp_path_factory.mktemp("tls")
    cert, key = development_certificate(directory)
    http_port, https_port = free_port(), free_port()
    env = platform.service_env("gateway") | EDGE_SETTINGS
    env |= {
        "GATEWAY_PORT": str(http_port),
        "GATEWAY_TLS_PORT": str(https_port),
        "TLS_CERT_FILE": str(cert),
        "TLS_KEY_FILE": str(key),
        "CONTACTS_URL": upstream.url,
        "TRACKING_URL": upstream.url,
    }
    process = ServiceProcess("gateway", env, platform.logs_dir / "edge-gateway.log", None)
    await process.start()
    edge = EdgeGateway(
        f"http://127.0.0.1:{http_port}",
        f"https://127.0.0.1:{https_port}",
        directory / "ca.pem",
        upstream,
        process,
    )
    try:
        deadline = time.monotonic() + 60
        async with edge.client(secure=True) as client:
            while True:
                assert process.alive, f"see {platform.logs_dir}/edge-gateway.log"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the edge gateway did not come up"
                await asyncio.sleep(0.2)
        yield edge
    finally:
        await process.stop()
        server.should_exit = True
        await serving
