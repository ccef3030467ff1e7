"""A send request published on Kafka with a future `send_at` is held, then sent at that time.

The request is the README's example payload (every field of `email.requests`), published bare
with the `confluent-kafka` client (librdkafka, not the services' aiokafka) by an account that
signed up, confirmed its address and made a send-only API key, as another system would.
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
from confluent_kafka import Producer

from herald.devinfra.stack import Stack
from tests.e2e.test_schedule_timing import TOLERANCE_SECONDS, envelopes, fanout_started, lateness
from tests.gateway.conftest import Requests, new_account


def readme_payload(
    *, api_key: str, to: str, from_email: str, send_at: datetime, key: str
) -> dict[str, Any]:
    """The example request of the README, with this test's key, addresses and time."""
    return {
        "api_key": api_key,
        "idempotency_key": key,
        "to": [to],
        "subject": "Your order {{ order_id }} ships {{ ship_day }}",
        "html": "<p>Hi {{ name }}, order <b>{{ order_id }}</b> ships {{ ship_day }}.</p>",
        "text": "Hi {{ name }}, order {{ order_id }} ships {{ ship_day }}.",
        "from_name": "Acme Shop",
        "from_email": from_email,
        "reply_to": "support@example.com",
        "send_at": send_at.isoformat(),
        "template_vars": {"name": "Dana", "order_id": "A-1042", "ship_day": "on Monday"},
        "tags": ["order", "shipping"],
    }


def publish(bootstrap: str, value: bytes, key: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    errors: list[Any] = []
    producer.produce(
        "email.requests", value=value, key=key.encode(), on_delivery=lambda e, _: errors.append(e)
    )
    assert producer.flush(15) == 0
    assert errors == [None]


async def inbox(sink: httpx.AsyncClient, address: str) -> list[dict[str, Any]]:
    items = (await sink.get("/api/messages", params={"to": address, "limit": 50})).json()["items"]
    return [(await sink.get(f"/api/messages/{m['id']}")).json() for m in items]


async def test_a_request_with_a_future_send_at_is_held_then_sent_on_time(
    platform: Stack,
    gateway: httpx.AsyncClient,
    sink: httpx.AsyncClient,
    sent_requests: Requests,
    db: asyncpg.Connection,
):
    account = await new_account(gateway, sent_requests)
    created = await gateway.post(
        "/api-keys", json={"name": "shop", "scope": "send"}, headers=account.headers
    )
    assert created.status_code == 201, created.text
    api_key = created.json()["key"]
    # The sender identity campaign checks `from_email` against arrives by `user.changed`.
    deadline = time.monotonic() + 30
    while not await db.fetchval(
        "SELECT email_verified FROM campaign.senders WHERE account_id = $1",
        uuid.UUID(account.user_id),
    ):
        assert time.monotonic() < deadline, "campaign never learnt the verified sender"
        await asyncio.sleep(0.1)

    to = f"held-{uuid.uuid4().hex[:8]}@example.com"
    key = f"order-{uuid.uuid4()}"
    send_at = datetime.now(UTC) + timedelta(seconds=8)
    payload = readme_payload(
        api_key=api_key, to=to, from_email=account.email, send_at=send_at, key=key
    )
    await asyncio.to_thread(publish, platform.kafka_bootstrap_servers, orjson.dumps(payload), key)

    async def email() -> dict[str, Any] | None:
        items = (await gateway.get("/emails", headers=account.headers)).json()["items"]
        ours = [e for e in items if e["to"] == [to]]
        return ours[0] if ours else None

    held = None
    while held is None:
        assert datetime.now(UTC) < send_at, "the request was not taken in before its send_at"
        held = await email()
        await asyncio.sleep(0.1)
    # Taken in as a scheduled email with every field of the request, not sent now.
    assert held["status"] == "scheduled"
    assert datetime.fromisoformat(held["send_at"]) == send_at
    assert (held["kind"], held["from_name"], held["from_email"], held["reply_to"]) == (
        "transactional",
        "Acme Shop",
        account.email,
        "support@example.com",
    )
    assert held["tags"] == ["order", "shipping"]
    assert held["template_vars"] == payload["template_vars"]
    while datetime.now(UTC) < send_at - timedelta(seconds=0.5):
        assert await inbox(sink, to) == [], "mail went out before its send_at"
        assert (await email() or {}).get("status") == "scheduled"
        await asyncio.sleep(0.3)

    deadline = time.monotonic() + 60
    while not (messages := await inbox(sink, to)):
        assert time.monotonic() < deadline, "the held request was never sent"
        await asyncio.sleep(0.2)
    (message,) = messages
    assert datetime.fromisoformat(message["received_at"]) >= send_at
    assert message["subject"] == "Your order A-1042 ships on Monday"
    assert "Hi Dana, order <b>A-1042</b> ships on Monday." in message["html"]
    assert "Hi Dana, order A-1042 ships on Monday." in message["text"]

    # The timer fired once, within the tolerance of the request's send_at.
    email_id = uuid.UUID(held["id"])
    (started,) = await envelopes(platform, "email.fanout", fanout_started({email_id}), expected=1)
    assert 0 <= lateness(started.occurred_at, send_at) <= TOLERANCE_SECONDS
    assert len(await inbox(sink, to)) == 1
