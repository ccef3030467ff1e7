"""End to end through the gateway: compose → send/schedule → scheduler → dispatcher → SMTP sink,
and send requests from other systems on `email.requests`.

Depends on the contacts service (lists, contacts, suppression, its internal recipients port) and
on the dispatcher (delivery into the sink, `email.dispatched` for the status roll-up).
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer

from herald.devinfra.stack import Stack
from herald.events import Envelope, decode
from herald.events.requests import SendRequested
from herald.events.scheduler import DispatchBatch, EmailFanoutStarted
from herald.links import LinkSigner, UnsubscribeToken
from tests.campaign.test_campaign_api import Account, publish_user
from tests.conftest import TokenMaker


@pytest.fixture
async def account(
    infra: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker, db: asyncpg.Connection
) -> Account:
    user_id = uuid.uuid4()
    email = f"sender-{user_id.hex[:10]}@example.com"
    await publish_user(infra, db, user_id, email, sender_name="Acme News")
    return Account(gateway, mint_token(user_id), user_id, email)


async def eventually(check: Callable[[], Any], *, timeout: float = 60, interval: float = 0.3):
    """The first truthy result of `check` (sync or async), polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(interval)


async def inbox(sink: httpx.AsyncClient, address: str) -> list[dict[str, Any]]:
    items = (await sink.get("/api/messages", params={"to": address, "limit": 50})).json()["items"]
    return [(await sink.get(f"/api/messages/{m['id']}")).json() for m in items]


async def make_audience(
    account: Account, infra: Stack, tag: str
) -> tuple[str, list[dict[str, Any]]]:
    """A list of three contacts (one of them unsubscribed by its one-click link)."""
    response = await account.call("POST", "/lists", json={"name": f"list-{tag}"})
    assert response.status_code == 201, response.text
    list_id = response.json()["id"]
    people = [
        {"email": f"ann-{tag}@example.com", "first_name": "Ann", "attributes": {"plan": "pro"}},
        {"email": f"bob-{tag}@example.com", "attributes": {"plan": "free"}},
        {"email": f"cy-{tag}@example.com", "first_name": "Cy", "attributes": {"plan": "pro"}},
    ]
    contacts = []
    for person in people:
        response = await account.call("POST", "/contacts", json={**person, "list_ids": [list_id]})
        assert response.status_code == 201, response.text
        contacts.append(response.json())
    signer = LinkSigner.from_spec(infra.secrets["LINK_SIGNING_KEYS"])
    token = signer.sign("unsubscribe", UnsubscribeToken(a=account.user_id, r=people[2]["email"]))
    response = await account.gateway.post(
        f"/unsubscribe/{token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code in (200, 204), response.text
    return list_id, contacts


PERSONAL = {
    "subject": 'Hello {{ contact.first_name | default("there") }}',
    "html": (
        "<p>Your plan: {{ contact.attributes.plan }}</p>"
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
    ),
}


async def test_a_list_email_reaches_every_active_member_personalised(
    account: Account, infra: Stack, sink: httpx.AsyncClient
):
    tag = uuid.uuid4().hex[:8]
    list_id, contacts = await make_audience(account, infra, tag)
    draft = await account.compose(**PERSONAL, list_ids=[list_id], from_email=account.email)

    preview = await account.call(
        "POST", f"/emails/{draft['id']}/preview", json={"contact_id": contacts[0]["id"]}
    )
    assert preview.status_code == 200, preview.text
    assert preview.json()["subject"] == "Hello Ann"
    assert "Your plan: pro" in preview.json()["html"]

    me = f"me-{tag}@example.com"
    assert (
        await account.call("POST", f"/emails/{draft['id']}/test", json={"to": me})
    ).status_code == 202

    response = await account.call("POST", "/send", json={"email_id": draft["id"]})
    assert response.status_code == 202
    assert response.json() == {"id": draft["id"], "status": "queued"}

    # What the scheduler handed to the dispatcher: the active members, once, with their data.
    def ours(raw: bytes | None) -> bool:
        data = decode(raw).data
        return isinstance(data, DispatchBatch) and str(data.email_id) == draft["id"]

    batches = [decode(v).data for v, _ in await read_topic(infra, "email.dispatch", ours, settle=1)]
    recipients = {r.email: r for b in batches for r in b.recipients}
    assert set(recipients) == {f"ann-{tag}@example.com", f"bob-{tag}@example.com"}
    assert recipients[f"ann-{tag}@example.com"].first_name == "Ann"
    assert recipients[f"bob-{tag}@example.com"].attributes == {"plan": "free"}
    assert batches[-1].last_batch
    assert batches[-1].total_recipients == 2

    (copy,) = await eventually(lambda: inbox(sink, me))
    assert copy["subject"] == "[Test] Hello there"

    (ann,) = await eventually(lambda: inbox(sink, f"ann-{tag}@example.com"))
    (bob,) = await eventually(lambda: inbox(sink, f"bob-{tag}@example.com"))
    assert ann["subject"] == "Hello Ann"
    assert "Your plan: pro" in ann["html"]
    assert "Your plan: pro" in ann["text"]
    assert bob["subject"] == "Hello there"
    assert "Your plan: free" in bob["html"]
    assert "Acme News" in ann["from"]
    assert account.email in ann["from"]

    email = await eventually(
        lambda: _when_status(account, draft["id"], "sent"), timeout=90, interval=0.5
    )
    assert email["counts"] == {"queued": 2, "sent": 2, "failed": 0}
    # The unsubscribed member never got it, and nobody got it twice.
    assert await inbox(sink, f"cy-{tag}@example.com") == []
    assert len(await inbox(sink, f"ann-{tag}@example.com")) == 1


async def _when_status(account: Account, email_id: str, status: str) -> dict[str, Any] | None:
    email: dict[str, Any] = (await account.call("GET", f"/emails/{email_id}")).json()
    return email if email["status"] == status else None


async def test_an_email_scheduled_ten_seconds_ahead_goes_out_then_not_before(
    account: Account, infra: Stack, sink: httpx.AsyncClient
):
    tag = uuid.uuid4().hex[:8]
    list_id, _ = await make_audience(account, infra, tag)
    draft = await account.compose(**PERSONAL, list_ids=[list_id])
    send_at = datetime.now(UTC) + timedelta(seconds=10)
    response = await account.call(
        "POST", "/schedule", json={"email_id": draft["id"], "send_at": send_at.isoformat()}
    )
    assert response.status_code == 202
    assert response.json()["status"] == "scheduled"
    ann = f"ann-{tag}@example.com"
    while datetime.now(UTC) < send_at - timedelta(seconds=1):
        assert await inbox(sink, ann) == [], "mail went out before its time"
        await asyncio.sleep(0.5)
    (message,) = await eventually(lambda: inbox(sink, ann))
    assert datetime.fromisoformat(message["received_at"]) >= send_at
    await eventually(lambda: inbox(sink, f"bob-{tag}@example.com"))
    assert await inbox(sink, f"cy-{tag}@example.com") == []
    await eventually(lambda: _when_status(account, draft["id"], "sent"), timeout=90)


async def read_topic(
    infra: Stack, topic: str, keep: Callable[[Any], bool], *, settle: float, timeout: float = 60
) -> list[tuple[Any, dict[str, bytes]]]:
    """(value, headers) of the messages on `topic` that `keep` accepts, read from the start
    until nothing new came for `settle` seconds (after one was found), or `timeout`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    found: list[tuple[Any, dict[str, bytes]]] = []
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and not (found and time.monotonic() - last > settle):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    if keep(record.value):
                        found.append((record.value, dict(record.headers or ())))
                        last = time.monotonic()
    finally:
        await consumer.stop()
    return found


async def test_a_cancelled_email_is_never_handed_out(account: Account, infra: Stack):
    draft = await account.compose(text="t", to=[f"never-{uuid.uuid4().hex[:8]}@example.com"])
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    await account.call(
        "POST", "/schedule", json={"email_id": draft["id"], "send_at": send_at.isoformat()}
    )
    assert (await account.call("POST", f"/emails/{draft['id']}/cancel")).status_code == 200
    # A marker email scheduled after it shows the scheduler got past that moment.
    marker = await account.compose(text="t", to=[f"marker-{uuid.uuid4().hex[:8]}@example.com"])
    await account.call(
        "POST",
        "/schedule",
        json={"email_id": marker["id"], "send_at": (send_at + timedelta(seconds=1)).isoformat()},
    )
    ids = {draft["id"], marker["id"]}

    def fired(raw: bytes | None) -> bool:
        data = decode(raw).data
        return isinstance(data, EmailFanoutStarted) and str(data.email_id) in ids

    started = await read_topic(infra, "email.fanout", fired, settle=2)
    assert [str(decode(v).data.email_id) for v, _ in started] == [marker["id"]]
    assert (await account.call("GET", f"/emails/{draft['id']}")).json()["status"] == "cancelled"


def librdkafka_producer(infra: Stack) -> Producer:
    return Producer({"bootstrap.servers": infra.kafka_bootstrap_servers, "acks": "all"})


def produce(producer: Producer, value: bytes, key: str) -> None:
    errors: list[Any] = []
    producer.produce(
        "email.requests", value=value, key=key.encode(), on_delivery=lambda e, _: errors.append(e)
    )
    assert producer.flush(15) == 0
    assert errors == [None]


async def test_a_send_request_published_with_librdkafka_is_delivered_once(
    account: Account, infra: Stack, sink: httpx.AsyncClient
):
    to = f"req-{uuid.uuid4().hex[:8]}@example.com"
    key = f"signup-{uuid.uuid4()}"
    request = SendRequested(
        idempotency_key=key,
        to=[to],
        subject="Welcome {{ name }}",
        html="<p>Hello {{ name }}</p>",
        template_vars={"name": "Dana"},
    )
    producer = librdkafka_producer(infra)
    for _ in range(2):  # the same request twice (new envelope ids): one email
        envelope = Envelope.wrap(request, account_id=account.user_id)
        await asyncio.to_thread(produce, producer, envelope.to_bytes(), key)

    async def listed() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await account.call("GET", "/emails")).json()["items"]
        return items

    (email,) = await eventually(listed)
    assert (email["kind"], email["to"], email["subject"]) == (
        "transactional",
        [to],
        request.subject,
    )
    (message,) = await eventually(lambda: inbox(sink, to))
    assert message["subject"] == "Welcome Dana"
    assert "Hello Dana" in message["html"]
    await asyncio.sleep(1)
    assert len(await inbox(sink, to)) == 1
    assert len(await listed()) == 1


async def test_malformed_send_requests_land_on_the_dead_letter_topic(infra: Stack):
    marker = uuid.uuid4().hex
    producer = librdkafka_producer(infra)
    bad = {
        f"{{not json {marker}".encode(): "not JSON",
        orjson.dumps(
            {
                "idempotency_key": marker,
                "api_key": "k",
                "to": "x@example.com",
                "subject": "s",
                "text": "t",
                "colour": "red",
            }
        ): "unknown key(s): colour",
        orjson.dumps(
            {
                "idempotency_key": marker,
                "api_key": "k",
                "to": ["not an address"],
                "subject": "s",
                "text": "t",
            }
        ): "not a valid email address",
        orjson.dumps(
            {"idempotency_key": marker, "to": ["x@example.com"], "subject": "s", "text": "t"}
        ): "api_key: required",
    }
    for value in bad:
        await asyncio.to_thread(produce, producer, value, marker)
    dead = await read_topic(
        infra, "email.requests.dlq", lambda raw: marker.encode() in (raw or b""), settle=2
    )
    reasons = {value: headers["dlq.reason"].decode() for value, headers in dead}
    assert set(reasons) == set(bad)
    for value, expected in bad.items():
        assert expected in reasons[value], reasons[value]


async def test_the_quota_counts_list_members_before_anything_goes_out(
    infra: Stack, db: asyncpg.Connection, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    user_id = uuid.uuid4()
    email = f"quota-list-{user_id.hex[:8]}@example.com"
    await publish_user(infra, db, user_id, email, quota=2)
    caller = Account(gateway, mint_token(user_id), user_id, email)
    tag = uuid.uuid4().hex[:8]
    list_id, _ = await make_audience(caller, infra, tag)  # two active members, one unsubscribed
    extra = await caller.compose(text="t", list_ids=[list_id], to=[f"extra-{tag}@example.com"])
    response = await caller.call("POST", "/send", json={"email_id": extra["id"]})
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert (await caller.call("GET", f"/emails/{extra['id']}")).json()["status"] == "draft"
    fits = await caller.compose(text="t", list_ids=[list_id])
    assert (await caller.call("POST", "/send", json={"email_id": fits["id"]})).status_code == 202
