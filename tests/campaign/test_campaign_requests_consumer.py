"""The `email.requests` consumer's checks, against the real database and a fake auth service.

API keys are auth's to verify (`POST /internal/api-keys/verify`); here a small fake answers for
it, so every path of a request (bare or enveloped, known or unknown key, refused by the sender
rules or the quota, repeated) is exercised in-process on a schema of its own.
"""

import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from campaign import store
from campaign.clients import AuthClient
from campaign.config import Settings
from campaign.handlers import when_send_requested_queue
from campaign.requests import RequestsConsumer
from herald import db as herald_db
from herald import migrations
from herald.devinfra.stack import Stack
from herald.events import Envelope, PoisonMessage, decode
from herald.events.auth import UserChanged
from herald.events.campaign import EmailScheduled
from herald.events.requests import SendRequested
from herald.kafka import create_producer

ACCOUNT = uuid.uuid4()
KEY = "hk_test_known"


class FakeAuth:
    """Auth's API key check, and its `GET /internal/users/{id}` answering `user` (404 if
    None); `outages` and `user_outages` answer 503 to that many calls of each."""

    def __init__(self) -> None:
        self.outages = 0
        self.calls = 0
        self.user_outages = 0
        self.user_calls = 0
        self.user: UserChanged | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["x-internal-token"]
        if request.url.path == f"/internal/users/{ACCOUNT}":
            self.user_calls += 1
            if self.user_outages:
                self.user_outages -= 1
                return httpx.Response(503)
            if self.user is None:
                return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})
            return httpx.Response(200, content=self.user.model_dump_json())
        assert request.url.path == "/internal/api-keys/verify"
        self.calls += 1
        if self.outages:
            self.outages -= 1
            return httpx.Response(503)
        if orjson.loads(request.content)["api_key"] == KEY:
            return httpx.Response(200, json={"account_id": str(ACCOUNT), "scope": "send"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})


class Harness:
    def __init__(
        self, pool: asyncpg.Pool, consumer: RequestsConsumer, auth: FakeAuth, settings: Settings
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.consumer = consumer
        self.auth = auth

    async def sender(self, *, verified: bool = True, quota: int | None = None) -> None:
        async with self.pool.acquire() as conn:
            await store.put_sender(
                conn,
                account_id=ACCOUNT,
                email="shop@example.com",
                email_verified=verified,
                default_sender_name="Shop",
                reply_to=None,
                timezone="UTC",
                status="active",
                daily_send_quota=quota,
            )

    async def handle(self, envelope: Envelope[Any]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await when_send_requested_queue(envelope, conn, settings=self.settings)

    async def emails(self) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return list(await conn.fetch("SELECT * FROM emails ORDER BY created_at"))

    async def scheduled(self) -> list[EmailScheduled]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT payload FROM outbox ORDER BY seq")
        return [
            d for d in (decode(r["payload"]).data for r in rows) if isinstance(d, EmailScheduled)
        ]


@pytest.fixture
async def harness(infra: Stack, scratch_schema: str) -> AsyncIterator[Harness]:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrations.migrate(
            conn, schema=scratch_schema, migrations=migrations.migrations_for("campaign")
        )
    finally:
        await conn.close()
    settings = Settings(
        database_url=infra.database_url, kafka_bootstrap_servers=infra.kafka_bootstrap_servers
    )
    pool = await herald_db.create_pool(infra.database_url, schema=scratch_schema, max_size=4)
    auth = FakeAuth()
    http = httpx.AsyncClient(transport=httpx.MockTransport(auth.handle))
    producer = create_producer(settings)
    await producer.start()
    consumer = RequestsConsumer(
        settings=settings,
        pool=pool,
        producer=producer,
        auth=AuthClient(
            http, base_url="http://auth", headers={"X-Internal-Token": "t"}, cache_seconds=0
        ),
        handler=functools.partial(when_send_requested_queue, settings=settings),
    )
    try:
        yield Harness(pool, consumer, auth, settings)
    finally:
        await producer.stop()
        await http.aclose()
        await pool.close()


def bare(**fields: Any) -> bytes:
    document = {
        "api_key": KEY,
        "idempotency_key": "order-77",
        "to": "buyer@example.com",
        "subject": "Order {{ order }}",
        "html": "<p>Thanks for order {{ order }}</p>",
        "template_vars": {"order": 77},
        **fields,
    }
    return orjson.dumps(document)


async def test_a_bare_request_with_a_known_key_is_queued_once(harness: Harness):
    await harness.sender()
    ready = await harness.consumer.accept(bare())
    assert ready is not None
    assert ready.account_id == ACCOUNT
    assert ready.data.api_key is None  # the secret is not carried any further
    again = await harness.consumer.accept(bare())
    assert again is not None
    assert again.id == ready.id  # a bare request's id comes from its idempotency key
    assert await harness.emails() == []  # the checks ran in a transaction that was rolled back

    await harness.handle(ready)
    await harness.handle(again)
    (email,) = await harness.emails()
    assert (email["status"], email["kind"], email["from_email"]) == (
        "queued",
        "transactional",
        "shop@example.com",
    )
    assert email["text"] == "Thanks for order {{ order }}\n"
    (event,) = await harness.scheduled()
    assert event.audience.to == ["buyer@example.com"]
    assert event.template_vars == {"order": 77}
    assert event.content.from_name == "Shop"


async def test_auth_outages_are_waited_out(harness: Harness):
    await harness.sender()
    harness.auth.outages = 2
    assert await harness.consumer.accept(bare()) is not None
    assert harness.auth.calls == 3


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (bare(api_key="hk_wrong"), "unknown or revoked API key"),
        (bare(system=True), "only Herald's own services send system mail"),
        (bare(from_email="ceo@elsewhere.com"), "not a sender this account may use"),
    ],
)
async def test_refused_requests_say_why(harness: Harness, raw: bytes, reason: str):
    await harness.sender()
    with pytest.raises(PoisonMessage) as caught:
        await harness.consumer.accept(raw)
    assert reason in caught.value.reason


async def test_an_envelope_names_its_account_and_may_not_contradict_its_key(harness: Harness):
    await harness.sender()
    request = SendRequested(idempotency_key="e-1", to=["a@example.com"], subject="s", text="t")
    ready = await harness.consumer.accept(Envelope.wrap(request, account_id=ACCOUNT).to_bytes())
    assert ready is not None
    assert ready.account_id == ACCOUNT
    assert harness.auth.calls == 0
    keyed = request.model_copy(update={"api_key": KEY})
    with pytest.raises(PoisonMessage, match="does not match"):
        await harness.consumer.accept(Envelope.wrap(keyed, account_id=uuid.uuid4()).to_bytes())


def _user(*, verified: bool) -> UserChanged:
    return UserChanged(
        user_id=ACCOUNT,
        email="shop@example.com",
        email_verified=verified,
        default_sender_name="Shop",
        timezone="UTC",
        status="active",
        role="user",
    )


async def test_unverified_senders_and_exhausted_quotas_are_refused(harness: Harness):
    await harness.sender(verified=False)
    harness.auth.user = _user(verified=False)
    with pytest.raises(PoisonMessage, match="from_email"):
        await harness.consumer.accept(bare())
    assert harness.auth.user_calls == 1  # auth, the owner, was asked before refusing
    await harness.sender(quota=2)
    with pytest.raises(PoisonMessage, match="quota_exceeded"):
        await harness.consumer.accept(bare(to=["a@example.com", "b@example.com", "c@example.com"]))
    assert await harness.consumer.accept(bare(to=["a@example.com", "b@example.com"])) is not None


async def test_system_mail_needs_no_verified_sender_and_skips_the_quota(harness: Harness):
    await harness.sender(verified=False, quota=0)
    request = SendRequested(
        idempotency_key="confirm-1",
        to=["new.user@herald.example"],
        subject="Confirm your address",
        text="Open the link",
        from_email="no-reply@herald.example",
        system=True,
    )
    ready = await harness.consumer.accept(Envelope.wrap(request, account_id=ACCOUNT).to_bytes())
    assert ready is not None
    await harness.handle(ready)
    (event,) = await harness.scheduled()
    assert event.kind == "system"
    assert event.content.from_email == "no-reply@herald.example"
    assert not event.content.track_clicks


@pytest.mark.parametrize("copy", ["missing", "unverified"])
async def test_a_sender_campaign_has_not_yet_seen_verified_is_asked_of_auth(
    harness: Harness, copy: str
):
    # A user who confirmed their address and published at once: `user.changed` is still on
    # its way to campaign, and auth knows better.
    if copy == "unverified":
        await harness.sender(verified=False)
    harness.auth.user = _user(verified=True)
    ready = await harness.consumer.accept(bare())
    assert ready is not None
    assert harness.auth.user_calls == 1
    await harness.handle(ready)
    (email,) = await harness.emails()
    assert (email["status"], email["from_email"]) == ("queued", "shop@example.com")
    async with harness.pool.acquire() as conn:
        stored = await store.get_sender(conn, account_id=ACCOUNT)
    assert stored is not None
    assert stored["email_verified"]


async def test_auth_outages_while_asking_for_the_sender_are_waited_out(harness: Harness):
    harness.auth.user = _user(verified=True)
    harness.auth.user_outages = 2
    assert await harness.consumer.accept(bare()) is not None
    assert harness.auth.user_calls == 3
