"""A new user who confirms their address and sends at once is not refused because campaign has
not yet taken in auth's `user.changed` (its copy of the sender identity is eventually
consistent).

The race is made deterministic: once campaign has the account's verified identity (so no event
of it is still on its way), the test takes it back, as if the events had not arrived, by
deleting campaign's row or setting it back to unverified. Every way of sending must then ask
auth, succeed, and leave campaign's copy verified again.
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.gateway.conftest import Account, Requests, new_account


async def _sender_row(db: asyncpg.Connection, account: Account) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT email, email_verified, updated_at FROM campaign.senders WHERE account_id = $1",
        uuid.UUID(account.user_id),
    )


async def _verified_in_campaign(db: asyncpg.Connection, account: Account) -> None:
    """Wait until campaign's copy of the account is verified (its events all arrived)."""
    deadline = time.monotonic() + 60
    while True:
        row = await _sender_row(db, account)
        if row is not None and row["email_verified"]:
            return
        assert time.monotonic() < deadline, "campaign never took in the verification"
        await asyncio.sleep(0.1)


async def _behind(db: asyncpg.Connection, account: Account, how: str) -> None:
    """Campaign's copy as if `user.changed` had not arrived (`missing`) or only the sign-up's
    had (`unverified`)."""
    await _verified_in_campaign(db, account)
    account_id = uuid.UUID(account.user_id)
    if how == "missing":
        await db.execute("DELETE FROM campaign.senders WHERE account_id = $1", account_id)
    else:
        await db.execute(
            "UPDATE campaign.senders SET email_verified = false WHERE account_id = $1",
            account_id,
        )


async def _delivered_from(sink: httpx.AsyncClient, to: str, timeout: float = 60) -> str:
    """The From of the message the sink received for `to`."""
    deadline = time.monotonic() + timeout
    while True:
        items = (await sink.get("/api/messages", params={"to": to, "limit": 5})).json()["items"]
        if items:
            message: dict[str, Any] = (await sink.get(f"/api/messages/{items[0]['id']}")).json()
            return str(message["from"])
        assert time.monotonic() < deadline, f"nothing was delivered to {to}"
        await asyncio.sleep(0.2)


async def _compose(gateway: httpx.AsyncClient, account: Account, to: str) -> str:
    response = await gateway.post(
        "/compose",
        json={"subject": "First", "text": "Hello", "to": [to]},
        headers=account.headers,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize("how", ["missing", "unverified"])
@pytest.mark.parametrize("path", ["inline", "draft", "test", "schedule"])
async def test_a_confirmed_user_can_send_before_campaign_hears_of_it(
    gateway: httpx.AsyncClient,
    sent_requests: Requests,
    db: asyncpg.Connection,
    sink: httpx.AsyncClient,
    how: str,
    path: str,
):
    account = await new_account(gateway, sent_requests)
    to = f"first-{uuid.uuid4().hex[:10]}@example.com"
    email_id = None if path == "inline" else await _compose(gateway, account, to)
    await _behind(db, account, how)

    body: dict[str, Any]
    if path == "inline":
        body = {"to": [to], "subject": "First", "text": "Hello"}
        response = await gateway.post("/send", json=body, headers=account.headers)
    elif path == "draft":
        body = {"email_id": email_id}
        response = await gateway.post("/send", json=body, headers=account.headers)
    elif path == "test":
        response = await gateway.post(
            f"/emails/{email_id}/test", json={"to": to}, headers=account.headers
        )
    else:
        # Naive: in the profile's timezone, which campaign also learns from auth here.
        send_at = (datetime.now(UTC) + timedelta(days=30)).replace(tzinfo=None)
        body = {"email_id": email_id, "send_at": send_at.isoformat()}
        response = await gateway.post("/schedule", json=body, headers=account.headers)
    assert response.status_code == 202, response.text

    row = await _sender_row(db, account)
    assert row is not None
    assert (row["email"], row["email_verified"]) == (account.email, True)
    if path != "schedule":
        assert account.email in await _delivered_from(sink, to)


async def test_auth_is_asked_only_while_campaigns_copy_is_behind(
    gateway: httpx.AsyncClient, sent_requests: Requests, db: asyncpg.Connection
):
    """Auth's answer replaces campaign's copy that was behind; a verified copy is used as it
    is, without asking auth or writing it again."""
    account = await new_account(gateway, sent_requests)
    await _behind(db, account, "unverified")
    before = await _sender_row(db, account)
    assert before is not None
    response = await gateway.post(
        "/send",
        json={"to": ["someone@example.com"], "subject": "s", "text": "t"},
        headers=account.headers,
    )
    assert response.status_code == 202, response.text
    after = await _sender_row(db, account)
    assert after is not None
    assert after["email_verified"]
    assert after["updated_at"] > before["updated_at"]
    response = await gateway.post(
        "/send",
        json={"to": ["someone@example.com"], "subject": "s", "text": "t"},
        headers=account.headers,
    )
    assert response.status_code == 202, response.text
    again = await _sender_row(db, account)
    assert again is not None
    assert again["updated_at"] == after["updated_at"]
