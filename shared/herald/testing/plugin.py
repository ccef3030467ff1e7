"""A pytest plugin (loaded with `-p herald.testing.plugin`) that starts infrastructure once.

`infra`: PostgreSQL, the broker and the SMTP sink, with topics and migrations, once per session.
By default they are the embedded ones on free ports; with `TEST_INFRA=containers` (and a Docker
engine) PostgreSQL and Apache Kafka come from testcontainers instead. `platform`: every service
as a process on top of `infra`, for end-to-end tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig


def _containers() -> Iterator[tuple[str, str]]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with (
        PostgresContainer("postgres:18", driver=None) as pg,
        KafkaContainer("confluentinc/cp-kafka:7.7.1").with_kraft() as kafka,
    ):
        yield pg.get_connection_url(), kafka.get_bootstrap_server()


@pytest.fixture(scope="session")
def infra_urls() -> Iterator[tuple[str | None, str | None]]:
    """Externally provided (database URL, Kafka bootstrap), or (None, None) for embedded ones."""
    if os.environ.get("TEST_INFRA") == "containers":
        yield from _containers()
    else:
        yield None, None


@pytest.fixture(scope="session")
async def infra(infra_urls: tuple[str | None, str | None]) -> AsyncIterator[Stack]:
    """Database, broker and SMTP sink with topics and migrations applied; services not started."""
    database_url, kafka = infra_urls
    # Not pytest's tmp_path: that is private to root, and PostgreSQL runs as its own user.
    data_dir = Path(tempfile.mkdtemp(prefix="herald-test-"))
    os.chmod(data_dir, 0o755)  # noqa: S103 - readable by PostgreSQL's own user
    config = StackConfig(
        data_dir=data_dir,
        service_ports={name: free_port() for name in SERVICES},
        database_url=database_url,
        kafka_bootstrap_servers=kafka,
        pg_port=free_port(),
        broker_port=free_port(),
        sink_smtp_port=free_port(),
        sink_http_port=free_port(),
        durable=False,
        kafka_partitions=3,
        env={"HERALD_ENV": "test", "LOG_LEVEL": "INFO", "KAFKA_SESSION_TIMEOUT_MS": "2000"},
    )
    stack = Stack(config)
    try:
        await stack.start_infrastructure()
        await stack.create_topics()
        await stack.migrate()
        yield stack
    finally:
        await stack.stop()
        # HERALD_KEEP_TEST_DATA=1 keeps the logs and data of a run for a post-mortem.
        if os.environ.get("HERALD_KEEP_TEST_DATA") != "1":
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def platform(infra: Stack) -> AsyncIterator[Stack]:
    """Every service running as its own process on top of `infra`."""
    try:
        for name in SERVICES:
            await infra.start_service(name)
        await infra.wait_ready(90)
        yield infra
    finally:
        await infra.stop_service("gateway")
        for name in list(infra.services):
            await infra.stop_service(name)


@pytest.fixture
async def db(infra: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database (no schema on its search path)."""
    conn = await asyncpg.connect(infra.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def scratch_schema(infra: Stack) -> AsyncIterator[str]:
    """A fresh, randomly named schema, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    conn = await asyncpg.connect(infra.database_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def gateway(platform: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client pointed at the running gateway."""
    async with httpx.AsyncClient(base_url=platform.url("gateway"), timeout=30) as client:
        yield client


@pytest.fixture
async def sink(infra: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client pointed at the SMTP sink's API."""
    async with httpx.AsyncClient(base_url=infra.sink_url, timeout=30) as client:
        yield client
        with contextlib.suppress(httpx.HTTPError):
            await client.delete("/api/behaviour")
