"""What the gateway costs: an authenticated read through it against the same read straight to the
service, in one run on this machine.

Latency is measured one request at a time (p50/p99 of `--requests` calls), throughput with
`--concurrency` clients for `--seconds`. The target is `GET /contacts` on the contacts service;
while that service does not answer it yet, `GET /profile` on auth (a real, confirmed user) is
measured instead, and the output says so. The gateway's rate limits are turned off for the run
(they would measure themselves), everything else is as deployed: token verification at the
gateway, identity headers, streaming proxy. The load generator shares the machine's cores.

    .venv/bin/python bench/gateway_overhead.py [--seconds 10] [--concurrency 16] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from auth.tokens import SigningKey, issue_access_token
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig

PASSWORD = "bench-orbit-candle-92-harbor"


@dataclass
class Target:
    service: str
    path: str
    headers: dict[str, str]


@dataclass
class Figures:
    p50_ms: float
    p99_ms: float
    rate: float


async def _profile_target(stack: Stack) -> Target:
    async with httpx.AsyncClient(base_url=stack.url("auth"), timeout=30) as client:
        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        response = await client.post(
            "/signup", json={"username": email.split("@")[0], "email": email, "password": PASSWORD}
        )
        response.raise_for_status()
        conn = await asyncpg.connect(stack.database_url)
        try:
            await conn.execute(
                "UPDATE auth.users SET email_verified = true WHERE email = $1", email
            )
        finally:
            await conn.close()
        tokens = await client.post("/login", json={"email": email, "password": PASSWORD})
        tokens.raise_for_status()
    bearer = {"Authorization": f"Bearer {tokens.json()['access_token']}"}
    return Target("auth", "/profile", bearer)


async def choose_target(stack: Stack) -> tuple[Target, str | None]:
    """GET /contacts if the contacts service answers it, else GET /profile (and why)."""
    key = SigningKey.from_pem(stack.secrets["JWT_PRIVATE_KEY"])
    token = issue_access_token(
        key,
        user_id=uuid.uuid4(),
        role="user",
        issuer="herald",
        audience="herald-api",
        ttl_seconds=3600,
    ).token
    contacts = Target("contacts", "/contacts", {"Authorization": f"Bearer {token}"})
    async with httpx.AsyncClient(timeout=10) as client:
        probe = await client.get(stack.url("contacts") + contacts.path, headers=contacts.headers)
    if probe.status_code == 200:
        return contacts, None
    note = (
        f"the contacts service answers GET /contacts with {probe.status_code} (not built yet): "
        "measured GET /profile on auth instead"
    )
    return await _profile_target(stack), note


async def serial_latency(base: str, target: Target, requests: int) -> list[float]:
    """Latencies of `requests` calls made one after another."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for _ in range(50):
            (await client.get(target.path, headers=target.headers)).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            response = await client.get(target.path, headers=target.headers)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    return latencies


async def throughput(base: str, target: Target, seconds: float, concurrency: int) -> float:
    """Requests/s answered with `concurrency` clients in a closed loop."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.get(target.path, headers=target.headers)
                response.raise_for_status()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def measure(
    base: str, target: Target, *, requests: int, seconds: float, concurrency: int
) -> Figures:
    latencies = await serial_latency(base, target, requests)
    rate = await throughput(base, target, seconds, concurrency)
    return Figures(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=statistics.quantiles(latencies, n=100)[98] * 1000,
        rate=rate,
    )


async def main(seconds: float, concurrency: int, requests: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    data_dir.chmod(0o755)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={s: free_port() for s in SERVICES},
            pg_port=free_port(),
            broker_port=free_port(),
            sink_smtp_port=free_port(),
            sink_http_port=free_port(),
            durable=False,
            env={
                "LOG_LEVEL": "WARNING",
                "RATE_LIMIT_IP_PER_SECOND": "0",
                "RATE_LIMIT_ACCOUNT_PER_SECOND": "0",
            },
        )
    )
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        for name in ("auth", "contacts", "gateway"):
            await stack.start_service(name)
        await stack.wait_ready(90, ["auth", "contacts"])
        target, note = await choose_target(stack)
        gateway = stack.url("gateway")
        # The gateway is ready only when every service is; it forwards as soon as it is up.
        async with httpx.AsyncClient(timeout=2) as probe:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get(gateway + "/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        direct = await measure(
            stack.url(target.service),
            target,
            requests=requests,
            seconds=seconds,
            concurrency=concurrency,
        )
        through = await measure(
            gateway, target, requests=requests, seconds=seconds, concurrency=concurrency
        )
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    if note:
        print(f"note: {note}")
    print(f"authenticated GET {target.path}: {requests} serial calls, then {concurrency} clients")
    for label, figures in (
        ("direct to " + target.service, direct),
        ("through the gateway", through),
    ):
        print(
            f"  {label:<22} p50 {figures.p50_ms:6.2f} ms  p99 {figures.p99_ms:6.2f} ms  "
            f"{figures.rate:7.0f} requests/s"
        )
    print(
        f"  gateway adds {through.p50_ms - direct.p50_ms:.2f} ms at p50 "
        f"({through.p99_ms - direct.p99_ms:.2f} ms at p99); throughput ratio "
        f"{through.rate / direct.rate:.2f} (aim: under 2 ms, at least 0.6)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    options = parser.parse_args()
    asyncio.run(main(options.seconds, options.concurrency, options.requests))
