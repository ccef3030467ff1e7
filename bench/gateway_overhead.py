"""What the gateway costs: an authenticated read through it against the same read straight to the
service, in one run on this machine.

Latency is measured one request at a time (p50/p99 of `--requests` calls), throughput with
`--concurrency` clients for `--seconds`, each way. The two ways take turns in `--rounds` rounds
(direct, gateway, direct, gateway...), so that other load on the machine weighs on both alike.
The target is `GET /contacts` on the contacts service; while that service does not answer it
yet, `GET /profile` on auth (a real, confirmed user) is measured instead, and the output says
so. The gateway's rate limits are turned off for the run (they would measure themselves),
everything else is as deployed: token verification at the gateway, identity headers, streaming
proxy. The load generator shares the machine's cores.

    .venv/bin/python bench/gateway_overhead.py [--seconds 10] [--concurrency 16] [--requests 2000]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil

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


async def serial_latency(client: httpx.AsyncClient, target: Target, requests: int) -> list[float]:
    """Latencies of `requests` calls made one after another."""
    latencies: list[float] = []
    for _ in range(requests):
        started = time.perf_counter()
        response = await client.get(target.path, headers=target.headers)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
    return latencies


async def throughput(
    client: httpx.AsyncClient, target: Target, seconds: float, concurrency: int
) -> tuple[int, float]:
    """Requests answered, and the seconds taken, by `concurrency` clients in a closed loop."""
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
    return done, time.perf_counter() - started


@dataclass
class Side:
    """One way to the service (direct or through the gateway), its clients and what they saw.

    `process` is the server this way is first answered by: its CPU time per loaded request is
    the figure other load on the machine disturbs least.
    """

    serial: httpx.AsyncClient
    loaded: httpx.AsyncClient
    process: psutil.Process
    latencies: list[float] = field(default_factory=list)
    done: int = 0
    elapsed: float = 0.0
    cpu_seconds: float = 0.0
    rates: list[float] = field(default_factory=list)

    def cpu_per_request_ms(self) -> float:
        return self.cpu_seconds / self.done * 1000

    def figures(self) -> Figures:
        return Figures(
            p50_ms=statistics.median(self.latencies) * 1000,
            p99_ms=statistics.quantiles(self.latencies, n=100)[98] * 1000,
            rate=self.done / self.elapsed,
        )


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measure(
    ways: tuple[tuple[str, psutil.Process], tuple[str, psutil.Process]],
    target: Target,
    *,
    requests: int,
    seconds: float,
    concurrency: int,
    rounds: int,
) -> tuple[Side, Side]:
    """Direct and gateway measured in turns (`rounds` of each), so that whatever else loads the
    machine meanwhile weighs on both alike."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with contextlib.AsyncExitStack() as stack:
        sides = []
        for base, process in ways:
            serial = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
            loaded = await stack.enter_async_context(
                httpx.AsyncClient(base_url=base, timeout=30, limits=limits)
            )
            sides.append(Side(serial, loaded, process))
        for side in sides:
            await serial_latency(side.serial, target, 50)
            await throughput(side.loaded, target, 0.5, concurrency)
        for _ in range(rounds):
            for side in sides:
                side.latencies += await serial_latency(side.serial, target, requests // rounds)
            for side in sides:
                cpu_before = _cpu_seconds(side.process)
                done, elapsed = await throughput(side.loaded, target, seconds / rounds, concurrency)
                side.cpu_seconds += _cpu_seconds(side.process) - cpu_before
                side.done += done
                side.elapsed += elapsed
                side.rates.append(done / elapsed)
    direct, through = sides
    return direct, through


def _process(stack: Stack, service: str) -> psutil.Process:
    running = stack.services[service].process
    assert running is not None
    return psutil.Process(running.pid)


async def main(seconds: float, concurrency: int, requests: int, rounds: int) -> None:
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
        load_before = os.getloadavg()[0]
        direct_side, through_side = await measure(
            (
                (stack.url(target.service), _process(stack, target.service)),
                (gateway, _process(stack, "gateway")),
            ),
            target,
            requests=requests,
            seconds=seconds,
            concurrency=concurrency,
            rounds=rounds,
        )
        load_after = os.getloadavg()[0]
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    direct, through = direct_side.figures(), through_side.figures()
    ratios = [g / d for d, g in zip(direct_side.rates, through_side.rates, strict=True)]
    if note:
        print(f"note: {note}")
    print(
        f"authenticated GET {target.path}: {requests} serial calls, then {concurrency} clients "
        f"for {seconds:g} s, each way, in {rounds} alternating rounds "
        f"(load average {load_before:.2f} before, {load_after:.2f} after)"
    )
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
        f"{through.rate / direct.rate:.2f} (aim: under 2 ms, at least 0.6); per round "
        f"{min(ratios):.2f}-{max(ratios):.2f}"
    )
    print(
        f"  CPU per loaded request: {target.service} {direct_side.cpu_per_request_ms():.2f} ms "
        f"(direct), gateway {through_side.cpu_per_request_ms():.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    asyncio.run(main(options.seconds, options.concurrency, options.requests, options.rounds))
