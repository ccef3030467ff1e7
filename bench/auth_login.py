"""Login and token-verification throughput of the auth service, on this machine, in one run.

Baselines measured in the same run: the bare argon2id verification the login is built around
(so logins/s reads as a fraction of what the hash cost allows on these cores), and a bare
`jwt.decode` for token verification.

    .venv/bin/python bench/auth_login.py [--seconds 10] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import jwt

from auth.passwords import HASHER
from auth.tokens import SigningKey, issue_access_token
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.security import Revocations, TokenVerifier

PASSWORD = "bench-orbit-candle-92-harbor"


def _verify_many(args: tuple[str, float]) -> int:
    encoded, seconds = args
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        HASHER.verify(encoded, PASSWORD)
        count += 1
    return count


def argon2_baseline(seconds: float) -> tuple[float, float]:
    """(ms per verification on one core, verifications/s on all cores)."""
    encoded = HASHER.hash(PASSWORD)
    started = time.perf_counter()
    one = _verify_many((encoded, seconds / 2))
    single_ms = (time.perf_counter() - started) * 1000 / one
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        total = sum(pool.map(_verify_many, [(encoded, seconds / 2)] * cores))
    return single_ms, total / (seconds / 2)


async def login_rate(stack: Stack, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    """Logins/s through the gateway with `concurrency` clients, and their latencies."""
    base = stack.url("gateway")
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        email = await _confirmed_user(stack, client)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post(
                    "/login",
                    json={"email": email, "password": PASSWORD},
                    headers={"X-Forwarded-For": f"10.1.{n}.1"},
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        return len(latencies) / (time.perf_counter() - started), latencies


async def _confirmed_user(stack: Stack, client: httpx.AsyncClient) -> str:
    import asyncpg

    email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
    response = await client.post(
        "/signup", json={"username": email.split("@")[0], "email": email, "password": PASSWORD}
    )
    response.raise_for_status()
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute("UPDATE auth.users SET email_verified = true WHERE email = $1", email)
    finally:
        await conn.close()
    return email


async def verification_rates(stack: Stack, seconds: float) -> tuple[float, float]:
    """(TokenVerifier.verify per second, bare jwt.decode per second), one core each."""
    key = SigningKey.from_pem(stack.secrets["JWT_PRIVATE_KEY"])
    token = issue_access_token(
        key,
        user_id=uuid.uuid4(),
        role="user",
        issuer="herald",
        audience="herald-api",
        ttl_seconds=600,
    ).token
    async with httpx.AsyncClient() as http:
        verifier = TokenVerifier(
            jwks_url=f"{stack.url('auth')}/.well-known/jwks.json",
            issuer="herald",
            audience="herald-api",
            http=http,
            revocations=Revocations(),
        )
        await verifier.verify(token)  # warms the key cache
        count, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            await verifier.verify(token)
            count += 1
        ours = count / seconds
    public = key.private.public_key()
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        jwt.decode(token, public, algorithms=["EdDSA"], audience="herald-api")
        count += 1
    return ours, count / seconds


async def main(seconds: float, concurrency: int) -> None:
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
            env={"LOG_LEVEL": "WARNING"},
        )
    )
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        for name in ("auth", "gateway"):
            await stack.start_service(name)
        await stack.wait_ready(90, ["auth"])
        single_ms, all_cores = argon2_baseline(seconds)
        rate, latencies = await login_rate(stack, seconds, concurrency)
        verify, bare = await verification_rates(stack, seconds / 2)
    finally:
        await stack.stop()
    p50 = statistics.median(latencies) * 1000
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000
    print(
        f"argon2id m=19MiB t=2 p=1: {single_ms:.1f} ms per verification on one core; "
        f"{all_cores:.0f} verifications/s on {os.cpu_count()} cores (baseline)"
    )
    print(
        f"logins through the gateway ({concurrency} clients, {seconds:.0f} s): {rate:.0f}/s, "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms; ratio to the argon2 ceiling {rate / all_cores:.2f}"
    )
    print(
        f"token verification: {verify:.0f}/s per core (herald TokenVerifier) vs "
        f"{bare:.0f}/s bare jwt.decode; ratio {verify / bare:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    options = parser.parse_args()
    asyncio.run(main(options.seconds, options.concurrency))
