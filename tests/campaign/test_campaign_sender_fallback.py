"""Campaign asks auth for an account's sender identity when its own copy (fed by
`user.changed`) is missing or unverified, against the real database and a fake auth service.

Covers what the end-to-end test cannot make happen on purpose: auth not knowing the account,
auth unavailable, and a `user.changed` written while auth was being asked.
"""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from campaign import emails, store
from campaign.clients import AuthClient, ContactsClient
from campaign.config import Settings
from campaign.schemas import SendRequest
from herald import db as herald_db
from herald import migrations
from herald.devinfra.stack import Stack
from herald.errors import ApiError
from herald.events.auth import UserChanged

ACCOUNT = uuid.uuid4()
ADDRESS = "new@example.com"


def _user(**changes: Any) -> UserChanged:
    fields: dict[str, Any] = {
        "user_id": ACCOUNT,
        "email": ADDRESS,
        "email_verified": True,
        "default_sender_name": "New",
        "timezone": "Europe/Paris",
        "status": "active",
        "role": "user",
    }
    return UserChanged(**(fields | changes))


class FakeAuth:
    """`GET /internal/users/{id}`: answers `user`, 404 when None, 503 during an outage."""

    def __init__(self) -> None:
        self.user: UserChanged | None = _user()
        self.outage = False
        self.calls = 0
        # Runs while the request is in flight (an event arriving meanwhile).
        self.meanwhile: Callable[[], Awaitable[None]] | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/internal/users/{ACCOUNT}"
        assert request.headers["x-internal-token"] == "t"
        self.calls += 1
        if self.meanwhile is not None:
            await self.meanwhile()
        if self.outage:
            return httpx.Response(503)
        if self.user is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})
        return httpx.Response(200, content=self.user.model_dump_json())


class Harness:
    def __init__(self, app: emails.Campaign, auth: FakeAuth) -> None:
        self.app = app
        self.auth = auth

    async def local(self, **changes: Any) -> None:
        """Campaign's copy, as `user.changed` writes it."""
        user = _user(**changes)
        async with self.app.pool.acquire() as conn:
            await store.put_sender(
                conn,
                account_id=ACCOUNT,
                email=user.email,
                email_verified=user.email_verified,
                default_sender_name=user.default_sender_name,
                reply_to=user.reply_to,
                timezone=user.timezone,
                status=user.status,
                daily_send_quota=user.daily_send_quota,
            )

    async def stored(self) -> asyncpg.Record | None:
        async with self.app.pool.acquire() as conn:
            return await store.get_sender(conn, account_id=ACCOUNT)

    async def send(self) -> asyncpg.Record:
        request = SendRequest(to=["someone@example.com"], subject="s", text="t")
        return await emails.send_inline(self.app, account_id=ACCOUNT, request=request)


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
    headers = {"X-Internal-Token": "t"}
    app = emails.Campaign(
        pool=pool,
        contacts=ContactsClient(http, base_url="http://contacts", headers=headers),
        auth=AuthClient(http, base_url="http://auth", headers=headers, cache_seconds=0),
        settings=settings,
    )
    try:
        yield Harness(app, auth)
    finally:
        await http.aclose()
        await pool.close()


async def test_a_verified_copy_is_used_without_asking_auth(harness: Harness):
    await harness.local()
    row = await harness.send()
    assert row["from_email"] == ADDRESS
    assert harness.auth.calls == 0


@pytest.mark.parametrize("copy", ["missing", "unverified"])
async def test_a_copy_behind_is_replaced_by_auths_answer(harness: Harness, copy: str):
    if copy == "unverified":
        await harness.local(email_verified=False, timezone="UTC")
    row = await harness.send()
    assert (row["from_email"], row["from_name"]) == (ADDRESS, "New")
    assert harness.auth.calls == 1
    stored = await harness.stored()
    assert stored is not None
    assert (stored["email_verified"], stored["timezone"]) == (True, "Europe/Paris")
    await harness.send()
    assert harness.auth.calls == 1


async def test_auths_refusals_stand(harness: Harness):
    harness.auth.user = _user(email_verified=False)
    with pytest.raises(ApiError) as refused:
        await harness.send()
    assert (refused.value.status, refused.value.details[0].field) == (422, "from_email")
    harness.auth.user = _user(status="disabled")
    with pytest.raises(ApiError) as disabled:
        await harness.send()
    assert disabled.value.status == 403


async def test_an_account_auth_does_not_know_keeps_todays_answer(harness: Harness):
    harness.auth.user = None
    with pytest.raises(ApiError) as refused:
        await harness.send()
    assert (refused.value.status, refused.value.details[0].field) == (422, "from_email")
    assert await harness.stored() is None


async def test_auth_unavailable_is_503_not_verify_first(harness: Harness):
    await harness.local(email_verified=False)
    harness.auth.outage = True
    with pytest.raises(ApiError) as unavailable:
        await harness.send()
    assert unavailable.value.status == 503
    assert "auth" in str(unavailable.value.message)


@pytest.mark.parametrize("copy", ["missing", "unverified"])
async def test_an_event_written_meanwhile_is_not_overwritten(harness: Harness, copy: str):
    if copy == "unverified":
        await harness.local(email_verified=False)

    async def event_arrives() -> None:
        await harness.local(email="changed@example.com", timezone="Asia/Tokyo")

    harness.auth.meanwhile = event_arrives
    row = await harness.send()
    # This decision uses auth's answer; the event, possibly newer, stays in place.
    assert row["from_email"] == ADDRESS
    stored = await harness.stored()
    assert stored is not None
    assert (stored["email"], stored["timezone"]) == ("changed@example.com", "Asia/Tokyo")
