"""The hot path's promises: answered opens and clicks survive a graceful shutdown, a full buffer
pushes back and then drops with a metric (never silently), and no request waits on the database."""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import uuid

import asyncpg
import httpx

from herald.devinfra.stack import Stack
from tests.conftest import TokenMaker
from tests.tracking.tracking_fakes import settings, tracking_in_process
from tests.tracking.tracking_helpers import (
    Account,
    Email,
    click_url,
    counts_when,
    dispatched,
    open_url,
    publish,
)

BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0"


async def stats(db: asyncpg.Connection, email: Email) -> dict[str, int]:
    row = await db.fetchrow(
        "SELECT opens, clicks FROM tracking.email_stats WHERE email_id = $1", email.id
    )
    return {"opens": row["opens"], "clicks": row["clicks"]} if row else {"opens": 0, "clicks": 0}


def dropped(metrics: str) -> float:
    found = re.search(
        r'^herald_tracking_events_dropped_total\{kind="open",reason="buffer_full"\} (\S+)$',
        metrics,
        flags=re.MULTILINE,
    )
    return float(found.group(1)) if found else 0.0


async def test_a_graceful_shutdown_writes_everything_answered(
    platform: Stack, db: asyncpg.Connection, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    # Nothing is flushed on its own within the test: only the shutdown writes.
    config = settings(platform, flush_interval_seconds=10, flush_batch=10_000)
    collector = gc.get_threshold()
    async with tracking_in_process(config) as service:
        # Buffered opens stay alive until written: passes every 700 of them cost ~6% of the CPU.
        assert gc.get_threshold() == (25_000, *collector[1:])
        for n in range(40):
            response = await service.get(
                open_url(platform, email, f"r{n % 5}@example.com"), headers={"User-Agent": BROWSER}
            )
            assert response.status_code == 200
        click = click_url(platform, email, "r0@example.com", 0, "https://example.com/")
        assert (await service.get(click, headers={"User-Agent": BROWSER})).status_code == 302
        assert await stats(db, email) == {"opens": 0, "clicks": 0}
    assert await stats(db, email) == {"opens": 40, "clicks": 1}
    # The rest of the process (other apps, tests) gets the collector back as it was.
    assert gc.get_threshold() == collector


async def test_a_full_buffer_pushes_back_then_drops_with_a_metric(
    platform: Stack, db: asyncpg.Connection, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    url = open_url(platform, email, "x@example.com")
    config = settings(
        platform,
        buffer_max=2,
        buffer_full_wait_seconds=0,
        flush_interval_seconds=10,
        flush_batch=10_000,
    )
    async with tracking_in_process(config) as service:
        before = dropped((await service.get("/metrics")).text)
        for _ in range(3):
            # Dropped or not, the person gets the pixel.
            assert (await service.get(url)).status_code == 200
        assert dropped((await service.get("/metrics")).text) == before + 1
    assert (await stats(db, email))["opens"] == 2

    # With time to wait, a full buffer wakes the flush worker and the request gets its room.
    patient = settings(
        platform,
        buffer_max=2,
        buffer_full_wait_seconds=5,
        flush_interval_seconds=10,
        flush_batch=10_000,
    )
    async with tracking_in_process(patient) as service:
        before = dropped((await service.get("/metrics")).text)
        answers = await asyncio.gather(*(service.get(url) for _ in range(6)))
        assert {a.status_code for a in answers} == {200}
        assert dropped((await service.get("/metrics")).text) == before
    assert (await stats(db, email))["opens"] == 8


async def test_sigterm_flushes_before_the_service_exits(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    reader = "reader@example.com"
    await publish(platform, dispatched(email, reader))
    await counts_when(gateway, email, lambda c: c["sent"] == 1)
    async with httpx.AsyncClient(base_url=platform.url("tracking"), timeout=10) as direct:
        answers = await asyncio.gather(
            *(direct.get(open_url(platform, email, reader)) for _ in range(100))
        )
        url = click_url(platform, email, reader, 3, f"https://example.com/{uuid.uuid4()}")
        answers.append(await direct.get(url, headers={"User-Agent": BROWSER}))
    assert {a.status_code for a in answers} == {200, 302}
    # At once: the click is still held for the burst check, the opens may be too.
    await platform.stop_service("tracking", signal.SIGTERM)
    await platform.start_service("tracking")
    await platform.wait_ready(60, ["tracking"])
    counts = await counts_when(gateway, email, lambda c: c["opens"] == 100 and c["clicks"] == 1)
    assert (counts["opens"], counts["clicks"]) == (100, 1)
