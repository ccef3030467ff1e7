"""The campaign API through the gateway: compose, list, edit, preview, send, schedule, cancel.

The account's sender identity comes from auth's `user.changed`; these tests publish that event
themselves (as auth would after a sign-up and verification) for accounts that only exist as
minted tokens.
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from herald.devinfra.stack import Stack
from herald.events import Envelope
from herald.events.auth import UserChanged
from tests.conftest import TokenMaker


class Account:
    """A caller of the API with its own token, and an address it has verified."""

    def __init__(self, gateway: httpx.AsyncClient, token: str, user_id: uuid.UUID, email: str):
        self.gateway = gateway
        self.user_id = user_id
        self.email = email
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.gateway.request(method, path, headers=self.headers, **kwargs)

    async def compose(self, **fields: Any) -> dict[str, Any]:
        body = {"subject": "Hello {{ contact.first_name }}", "html": "<p>Hi</p>", **fields}
        response = await self.call("POST", "/compose", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())


async def publish_user(
    infra: Stack,
    db: asyncpg.Connection,
    user_id: uuid.UUID,
    email: str,
    *,
    verified: bool = True,
    quota: int | None = None,
    timezone: str = "UTC",
    sender_name: str | None = "Test Sender",
) -> None:
    """Publish `user.changed` as auth does, and wait until campaign has taken it in."""
    change = UserChanged(
        user_id=user_id,
        email=email,
        email_verified=verified,
        status="active",
        role="user",
        timezone=timezone,
        daily_send_quota=quota,
        default_sender_name=sender_name,
    )
    producer = AIOKafkaProducer(bootstrap_servers=infra.kafka_bootstrap_servers)
    await producer.start()
    try:
        envelope = Envelope.wrap(change, account_id=user_id)
        await producer.send_and_wait(
            change.TOPIC, envelope.to_bytes(), key=change.partition_key().encode()
        )
    finally:
        await producer.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = await db.fetchrow(
            "SELECT email_verified, daily_send_quota, timezone FROM campaign.senders"
            " WHERE account_id = $1",
            user_id,
        )
        if row is not None and tuple(row) == (verified, quota, timezone):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("campaign never took in the user.changed event")


@pytest.fixture
async def account(
    infra: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker, db: asyncpg.Connection
) -> Account:
    user_id = uuid.uuid4()
    email = f"owner-{user_id.hex[:10]}@example.com"
    await publish_user(infra, db, user_id, email)
    return Account(gateway, mint_token(user_id), user_id, email)


@pytest.fixture
def stranger(gateway: httpx.AsyncClient, mint_token: TokenMaker) -> Account:
    user_id = uuid.uuid4()
    return Account(gateway, mint_token(user_id), user_id, f"s-{user_id.hex[:8]}@example.com")


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


async def test_every_endpoint_needs_a_caller(gateway: httpx.AsyncClient):
    some = uuid.uuid4()
    for method, path in [
        ("POST", "/compose"),
        ("GET", "/emails"),
        ("GET", f"/emails/{some}"),
        ("POST", f"/emails/{some}/preview"),
        ("POST", "/send"),
        ("POST", "/schedule"),
    ]:
        assert (await gateway.request(method, path, json={})).status_code == 401, path


async def test_compose_makes_a_draft_and_derives_the_text_part(account: Account):
    draft = await account.compose(
        subject='Hi {{ contact.first_name | default("there") }}',
        html=(
            "<h1>News</h1><p>Plan: {{ contact.attributes.plan }}</p>"
            '<a href="{{ unsubscribe_url }}">Leave</a>'
        ),
        from_email=account.email,
        to=["Someone@Example.com"],
        tags=["spring"],
    )
    assert draft["status"] == "draft"
    assert draft["kind"] == "campaign"
    assert (
        draft["text"]
        == "News\n\nPlan: {{ contact.attributes.plan }}\n\nLeave ({{ unsubscribe_url }})\n"
    )
    assert draft["to"] == ["Someone@example.com"]
    assert draft["counts"] == {"queued": None, "sent": 0, "failed": 0}
    fetched = (await account.call("GET", f"/emails/{draft['id']}")).json()
    assert fetched == draft


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"subject": "s"}, "html", "html or text"),
        ({"subject": "s", "html": "<p>\n{{ contact.first_name </p>"}, "html", "line 2"),
        ({"subject": "{% if %}", "text": "t"}, "subject", "line 1"),
        ({"subject": "s", "text": "t", "from_email": "boss@elsewhere.com"}, "from_email", "sender"),
        ({"subject": "s", "text": "t", "to": ["not-an-address"]}, "to.0", "email"),
        ({"subject": "", "text": "t"}, "subject", "at least 1"),
        ({"subject": "s", "text": "t", "colour": "red"}, "colour", "not permitted"),
        ({"subject": "s", "text": "t", "list_ids": ["nope"]}, "list_ids.0", "UUID"),
    ],
)
async def test_compose_refuses_bad_input_naming_the_field(
    account: Account, body: dict[str, Any], field: str, says: str
):
    problem = error(await account.call("POST", "/compose", json=body), 422)
    assert problem["details"][0]["field"] == field
    assert says in problem["message"] or says in problem["details"][0]["message"]


async def test_from_email_must_be_verified(infra: Stack, db, gateway, mint_token):
    user_id = uuid.uuid4()
    email = f"unverified-{user_id.hex[:8]}@example.com"
    await publish_user(infra, db, user_id, email, verified=False)
    caller = Account(gateway, mint_token(user_id), user_id, email)
    problem = error(
        await caller.call(
            "POST", "/compose", json={"subject": "s", "text": "t", "from_email": email}
        ),
        422,
    )
    assert problem["details"][0]["field"] == "from_email"
    # A draft without a sender is fine; sending it is not, until the address is verified.
    draft = await caller.compose(to=["x@example.com"])
    problem = error(await caller.call("POST", "/send", json={"email_id": draft["id"]}), 422)
    assert problem["details"][0]["field"] == "from_email"


async def test_emails_are_listed_newest_first_in_pages(account: Account):
    ids = [(await account.compose(subject=f"n{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await account.call("GET", "/emails", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    drafts = (await account.call("GET", "/emails", params={"status": "draft"})).json()
    assert {i["status"] for i in drafts["items"]} == {"draft"}
    assert (await account.call("GET", "/emails", params={"status": "sent"})).json()["items"] == []
    error(await account.call("GET", "/emails", params={"status": "bogus"}), 422)
    error(await account.call("GET", "/emails", params={"cursor": "garbage"}), 422)
    error(await account.call("GET", "/emails", params={"limit": 0}), 422)


async def test_another_accounts_email_is_not_found(account: Account, stranger: Account):
    draft = await account.compose()
    path = f"/emails/{draft['id']}"
    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"subject": "mine now"}),
        ("DELETE", "", None),
        ("POST", "/preview", {}),
        ("POST", "/test", {"to": "x@example.com"}),
        ("POST", "/cancel", None),
    ]:
        assert (await stranger.call(method, path + suffix, json=body)).status_code == 404
    assert (await stranger.call("POST", "/send", json={"email_id": draft["id"]})).status_code == 404
    schedule = {"email_id": draft["id"], "send_at": "2099-01-01T00:00:00Z"}
    assert (await stranger.call("POST", "/schedule", json=schedule)).status_code == 404
    assert draft["id"] not in str((await stranger.call("GET", "/emails")).json())
    assert (await account.call("GET", path)).json()["subject"] == draft["subject"]


async def test_drafts_can_be_edited_and_deleted_but_not_once_sent(account: Account):
    draft = await account.compose(html="<p>one</p>", to=["a@example.com"])
    path = f"/emails/{draft['id']}"
    edited = await account.call("PATCH", path, json={"html": "<p>two</p>", "tags": ["t"]})
    assert edited.status_code == 200, edited.text
    assert (edited.json()["text"], edited.json()["tags"]) == ("two\n", ["t"])
    error(await account.call("PATCH", path, json={"html": "{% for %}"}), 422)
    error(await account.call("PATCH", path, json={"subject": None}), 422)
    other = await account.compose(to=["a@example.com"])
    assert (await account.call("DELETE", f"/emails/{other['id']}")).status_code == 204
    assert (await account.call("GET", f"/emails/{other['id']}")).status_code == 404

    assert (await account.call("POST", "/send", json={"email_id": draft["id"]})).status_code == 202
    assert error(await account.call("PATCH", path, json={"subject": "late"}), 409)["code"] == (
        "conflict"
    )
    error(await account.call("DELETE", path), 409)
    error(await account.call("POST", "/send", json={"email_id": draft["id"]}), 409)


async def test_preview_renders_like_the_dispatcher_will(account: Account):
    draft = await account.compose(
        subject='Hi {{ contact.first_name | default("there") }} {{ code }}',
        html='<p>{{ code }} <a href="{{ unsubscribe_url }}">u</a> {{ "<b>" }}</p>',
        to=["reader@example.com"],
        template_vars={"code": "C-42"},
    )
    response = await account.call("POST", f"/emails/{draft['id']}/preview", json={})
    assert response.status_code == 200, response.text
    preview = response.json()
    assert preview["subject"] == "Hi there C-42"
    assert preview["to"] == "reader@example.com"
    # A stand-in, not a working link: clicking it in a preview must not unsubscribe anyone.
    assert '/unsubscribe/preview">u</a>' in preview["html"]
    assert "&lt;b&gt;" in preview["html"]
    assert preview["text"].startswith("C-42 u (http")
    # Without a body too.
    assert (await account.call("POST", f"/emails/{draft['id']}/preview")).status_code == 200
    broken = await account.compose(text="{{ 1 / 0 }}")
    problem = error(await account.call("POST", f"/emails/{broken['id']}/preview", json={}), 422)
    assert problem["code"] == "template_error"


async def test_inline_send_with_an_idempotency_key_creates_one_email(account: Account):
    body = {
        "to": ["buyer@example.com"],
        "subject": "Receipt {{ order }}",
        "text": "Thanks",
        "template_vars": {"order": "A1"},
        "idempotency_key": f"order-{uuid.uuid4()}",
    }
    first = await account.call("POST", "/send", json=body)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "queued"
    again = await account.call("POST", "/send", json=body)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    email = (await account.call("GET", f"/emails/{first.json()['id']}")).json()
    assert (email["kind"], email["from_email"], email["from_name"]) == (
        "transactional",
        account.email,
        "Test Sender",
    )
    error(await account.call("POST", "/send", json={"subject": "no recipients", "text": "x"}), 422)
    error(await account.call("POST", "/send", json={**body, "email_id": str(uuid.uuid4())}), 422)


async def test_schedule_needs_a_future_time_and_can_be_moved_and_cancelled(account: Account):
    draft = await account.compose(to=["later@example.com"])
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    problem = error(
        await account.call("POST", "/schedule", json={"email_id": draft["id"], "send_at": past}),
        422,
    )
    assert problem["details"][0]["field"] == "send_at"
    error(
        await account.call("POST", "/schedule", json={"email_id": draft["id"], "send_at": "soon"}),
        422,
    )

    when = datetime.now(UTC) + timedelta(hours=2)
    response = await account.call(
        "POST", "/schedule", json={"email_id": draft["id"], "send_at": when.isoformat()}
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "scheduled"
    assert datetime.fromisoformat(response.json()["send_at"]) == when
    moved = when + timedelta(hours=1)
    response = await account.call(
        "POST", "/schedule", json={"email_id": draft["id"], "send_at": moved.isoformat()}
    )
    assert datetime.fromisoformat(response.json()["send_at"]) == moved
    cancelled = await account.call("POST", f"/emails/{draft['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    error(await account.call("POST", f"/emails/{draft['id']}/cancel"), 409)
    error(
        await account.call(
            "POST", "/schedule", json={"email_id": draft["id"], "send_at": moved.isoformat()}
        ),
        409,
    )


async def test_a_time_without_a_zone_is_in_the_profile_timezone(infra, db, gateway, mint_token):
    user_id = uuid.uuid4()
    email = f"tokyo-{user_id.hex[:8]}@example.com"
    await publish_user(infra, db, user_id, email, timezone="Asia/Tokyo")
    caller = Account(gateway, mint_token(user_id), user_id, email)
    draft = await caller.compose(to=["x@example.com"])
    local = (datetime.now(ZoneInfo("Asia/Tokyo")) + timedelta(hours=3)).replace(
        tzinfo=None, microsecond=0
    )
    response = await caller.call(
        "POST", "/schedule", json={"email_id": draft["id"], "send_at": local.isoformat()}
    )
    assert response.status_code == 202, response.text
    sent_at = datetime.fromisoformat(response.json()["send_at"])
    assert sent_at == local.replace(tzinfo=ZoneInfo("Asia/Tokyo"))


async def test_the_daily_quota_refuses_an_email_that_would_exceed_it(
    infra, db, gateway, mint_token
):
    user_id = uuid.uuid4()
    email = f"quota-{user_id.hex[:8]}@example.com"
    await publish_user(infra, db, user_id, email, quota=3)
    caller = Account(gateway, mint_token(user_id), user_id, email)
    two = {"subject": "s", "text": "t", "to": ["a@example.com", "b@example.com"]}
    assert (await caller.call("POST", "/send", json=two)).status_code == 202
    problem = error(await caller.call("POST", "/send", json=two), 429)
    assert problem["code"] == "quota_exceeded"
    assert "1 left today" in problem["message"]
    one = {"subject": "s", "text": "t", "to": ["c@example.com"]}
    assert (await caller.call("POST", "/send", json=one)).status_code == 202
    error(await caller.call("POST", "/send", json=one), 429)
    # A refused email is not created at all: nothing of it can go out later.
    listed = (await caller.call("GET", "/emails")).json()["items"]
    assert len(listed) == 2
    assert {i["status"] for i in listed} <= {"queued", "sending", "sent", "failed"}


async def test_a_send_scoped_key_may_only_send(account: Account, gateway, mint_token):
    sender = Account(
        gateway, mint_token(account.user_id, scope="send"), account.user_id, account.email
    )
    problem = error(await sender.call("POST", "/compose", json={"subject": "s", "text": "t"}), 403)
    assert problem["code"] == "insufficient_scope"
    error(await sender.call("GET", "/emails"), 403)
    response = await sender.call(
        "POST", "/send", json={"subject": "s", "text": "t", "to": ["k@example.com"]}
    )
    assert response.status_code == 202, response.text


async def test_a_test_copy_is_queued_without_touching_the_email(account: Account):
    draft = await account.compose(to=["list@example.com"])
    response = await account.call(
        "POST", f"/emails/{draft['id']}/test", json={"to": "me@example.com"}
    )
    assert response.status_code == 202, response.text
    copy = response.json()
    assert copy["to"] == "me@example.com"
    assert copy["test_of"] == draft["id"]
    assert (await account.call("GET", f"/emails/{draft['id']}")).json()["status"] == "draft"
    stored = (await account.call("GET", f"/emails/{copy['id']}")).json()
    assert stored["subject"].startswith("[Test] ")
    assert stored["kind"] == "test"
    listed = (await account.call("GET", "/emails")).json()["items"]
    assert copy["id"] not in [i["id"] for i in listed]
    error(await account.call("POST", f"/emails/{draft['id']}/test", json={"to": "nope"}), 422)
