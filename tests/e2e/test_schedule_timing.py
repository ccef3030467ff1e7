"""Scheduled emails go out on time: the timer fires within a second of `send_at`, never before.

Through the gateway as a user schedules; the instant a timer fired is read three ways: the
`email.fanout_started` event's `occurred_at` (written in the firing transaction), the
scheduler's `fired_at`, and the moment the email's status, polled through the API, leaves
`scheduled`. Each must lie in [send_at, send_at + 1 s].
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from herald.devinfra.stack import Stack
from herald.events import Envelope, decode
from herald.events.scheduler import EmailFanoutStarted
from tests.campaign.test_campaign_api import Account, publish_user
from tests.conftest import TokenMaker

# The promise: a timer fires within a second of its send_at.
TOLERANCE_SECONDS = 1.0


async def envelopes(
    stack: Stack,
    topic: str,
    keep: Callable[[Envelope[Any]], bool],
    *,
    expected: int,
    timeout: float = 60,
) -> list[Envelope[Any]]:
    """The envelopes on `topic` that `keep` accepts, read from the beginning until `expected`
    were found (then for one more second, so that extra ones show) or `timeout`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    found: list[Envelope[Any]] = []
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        enough_at: float | None = None
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    envelope = decode(record.value)
                    if keep(envelope):
                        found.append(envelope)
            if len(found) >= expected:
                enough_at = enough_at or time.monotonic()
                if time.monotonic() - enough_at > 1:
                    break
    finally:
        await consumer.stop()
    return found


def fanout_started(ids: set[uuid.UUID]) -> Callable[[Envelope[Any]], bool]:
    return lambda e: isinstance(e.data, EmailFanoutStarted) and e.data.email_id in ids


def lateness(fired: datetime, send_at: datetime) -> float:
    """Seconds from `send_at` to `fired` (negative: fired early)."""
    return (fired - send_at).total_seconds()


@pytest.fixture
async def account(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker, db: asyncpg.Connection
) -> Account:
    user_id = uuid.uuid4()
    email = f"timer-{user_id.hex[:10]}@example.com"
    await publish_user(platform, db, user_id, email)
    return Account(gateway, mint_token(user_id), user_id, email)


async def status_left_scheduled(account: Account, email_id: str, until: float) -> datetime:
    """When the email's status, polled every 50 ms, was first seen past `scheduled`."""
    while time.monotonic() < until:
        status = (await account.call("GET", f"/emails/{email_id}")).json()["status"]
        if status != "scheduled":
            return datetime.now(UTC)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{email_id} stayed scheduled")


async def test_timers_fire_within_a_second_of_send_at_and_never_before(
    account: Account, platform: Stack, db: asyncpg.Connection
):
    # Odd offsets, so that the timers do not line up with the poller's rhythm.
    offsets = (3.13, 4.37, 5.71)
    send_at: dict[str, datetime] = {}
    base = datetime.now(UTC)
    for offset in offsets:
        to = f"timed-{uuid.uuid4().hex[:8]}@example.com"
        draft = await account.compose(text="on time", to=[to])
        at = base + timedelta(seconds=offset)
        response = await account.call(
            "POST", "/schedule", json={"email_id": draft["id"], "send_at": at.isoformat()}
        )
        assert response.status_code == 202, response.text
        assert datetime.fromisoformat(response.json()["send_at"]) == at
        send_at[draft["id"]] = at
    assert datetime.now(UTC) < base + timedelta(seconds=offsets[0]), "too slow to schedule"

    until = time.monotonic() + offsets[-1] + 30
    seen = await asyncio.gather(*(status_left_scheduled(account, i, until) for i in send_at))
    status_changed = dict(zip(send_at, seen, strict=True))

    ids = {uuid.UUID(i) for i in send_at}
    started = await envelopes(platform, "email.fanout", fanout_started(ids), expected=len(ids))
    assert sorted(str(e.data.email_id) for e in started) == sorted(send_at), "fired once each"
    fired_at = {
        str(r["email_id"]): r["fired_at"]
        for r in await db.fetch(
            "SELECT email_id, fired_at FROM scheduler.timers WHERE email_id = ANY($1::uuid[])",
            list(ids),
        )
    }
    for envelope in started:
        email_id = str(envelope.data.email_id)
        at = send_at[email_id]
        measured = {
            "event": lateness(envelope.occurred_at, at),
            "fired_at": lateness(fired_at[email_id], at),
            "status": lateness(status_changed[email_id], at),
        }
        for what, seconds in measured.items():
            assert 0 <= seconds <= TOLERANCE_SECONDS, (email_id, what, measured)
