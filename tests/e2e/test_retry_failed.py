"""Retrying a finished email's failed recipients, over the gateway (issue 9).

One recipient is refused for good (550, a hard bounce), two are deferred until the dispatcher's
retry horizon gives up on them, and one of those unsubscribes meanwhile. Once the relay takes
them, `retry-failed` delivers the other exactly once; the refused and the unsubscribed one are
not mailed again, nobody else gets a second copy, and the campaign's counts and tracking's
records end right.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from herald.devinfra.stack import Stack
from tests.conftest import TokenMaker
from tests.gateway.conftest import Account, Requests, new_account

# Retries a fraction of a second apart, given up on after a few seconds.
QUICK_RETRIES = {
    "DISPATCHER_RETRY_BASE": "0.2",
    "DISPATCHER_RETRY_MAX": "0.5",
    "DISPATCHER_RETRY_HORIZON": "3",
}


@pytest.fixture
async def quick_dispatcher(platform: Stack) -> AsyncIterator[None]:
    """The platform's dispatcher with a short retry horizon, put back as it was afterwards."""
    await platform.stop_service("dispatcher")
    try:
        await platform.start_service("dispatcher", env=QUICK_RETRIES)
        await platform.wait_ready(60, ["dispatcher"])
        yield
    finally:
        await platform.stop_service("dispatcher")
        await platform.start_service("dispatcher")
        await platform.wait_ready(60, ["dispatcher"])


async def email(gateway: httpx.AsyncClient, account: Account, email_id: str) -> dict[str, Any]:
    response = await gateway.get(f"/emails/{email_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def finished(
    gateway: httpx.AsyncClient, account: Account, email_id: str, *, sent: int
) -> dict[str, Any]:
    """The email once it is finished with `sent` recipients sent."""
    deadline = time.monotonic() + 60
    while True:
        body = await email(gateway, account, email_id)
        if body["status"] in ("sent", "failed") and body["counts"]["sent"] == sent:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


async def received(sink: httpx.AsyncClient, address: str) -> int:
    count: int = (await sink.get("/api/messages/count", params={"to": address})).json()["count"]
    return count


async def tracked(
    gateway: httpx.AsyncClient, account: Account, email_id: str, *, sent: int
) -> dict[str, Any]:
    """Tracking's view of the email once it counts `sent` recipients sent."""
    deadline = time.monotonic() + 30
    while True:
        response = await gateway.get(
            f"/tracking/{email_id}", params={"limit": 50}, headers=account.headers
        )
        if response.status_code == 200 and response.json()["counts"]["sent"] == sent:
            body: dict[str, Any] = response.json()
            return body
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.3)


async def test_retry_failed_sends_once_to_those_that_may_now_succeed(
    quick_dispatcher: None,
    gateway: httpx.AsyncClient,
    sink: httpx.AsyncClient,
    sent_requests: Requests,
    mint_token: TokenMaker,
):
    account = await new_account(gateway, sent_requests)
    tag = uuid.uuid4().hex[:8]
    ok = [f"ok{tag}-{n}@example.com" for n in range(3)]
    refused, deferred = f"refused{tag}@example.com", f"deferred{tag}@example.com"
    gone = f"gone{tag}@example.com"
    rules = [
        {"match": refused, "action": "reject"},
        {"match": deferred, "action": "defer"},
        {"match": gone, "action": "defer"},
    ]
    (await sink.put("/api/behaviour", json={"rules": rules})).raise_for_status()

    sent = await gateway.post(
        "/send",
        json={"to": [*ok, refused, deferred, gone], "subject": "Retry me", "text": "Once each."},
        headers=account.headers,
    )
    assert sent.status_code == 202, sent.text
    email_id = sent.json()["id"]
    retry = f"/emails/{email_id}/retry-failed"
    # Not finished yet: the deferred recipient is still being retried.
    early = await gateway.post(retry, headers=account.headers)
    assert early.status_code == 409, early.text
    assert "only a sent or failed email" in early.json()["error"]["message"]

    first = await finished(gateway, account, email_id, sent=3)
    assert (first["status"], first["counts"]) == ("sent", {"queued": 6, "sent": 3, "failed": 3})
    for address in (refused, deferred, gone):
        assert await received(sink, address) == 0, address
    # One of those deferred unsubscribes (here: the account suppresses the address by hand).
    contact = await gateway.post("/contacts", json={"email": gone}, headers=account.headers)
    assert contact.status_code == 201, contact.text
    unsubscribed = await gateway.patch(
        f"/contacts/{contact.json()['id']}",
        json={"status": "unsubscribed"},
        headers=account.headers,
    )
    assert unsubscribed.status_code == 200, unsubscribed.text

    # The relay takes the deferred address now; the refused one is still refused.
    rules = [{"match": refused, "action": "reject"}]
    (await sink.put("/api/behaviour", json={"rules": rules})).raise_for_status()
    stranger = {"Authorization": f"Bearer {mint_token()}"}
    assert (await gateway.post(retry, headers=stranger)).status_code == 404
    # A double click: one retry is accepted, the other finds it under way.
    answers = await asyncio.gather(
        gateway.post(retry, headers=account.headers), gateway.post(retry, headers=account.headers)
    )
    assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
    [accepted] = [a.json() for a in answers if a.status_code == 202]
    assert accepted["status"] == "sending"
    # The refused and the unsubscribed keep their failure; the deferred one is counted anew.
    assert accepted["counts"] == {"queued": 6, "sent": 3, "failed": 2}
    assert accepted["completed_at"] is None

    second = await finished(gateway, account, email_id, sent=4)
    assert (second["status"], second["counts"]) == ("sent", {"queued": 6, "sent": 4, "failed": 2})
    assert await received(sink, deferred) == 1
    assert await received(sink, refused) == 0
    assert await received(sink, gone) == 0
    for address in ok:
        assert await received(sink, address) == 1, address

    view = await tracked(gateway, account, email_id, sent=4)
    assert (view["counts"]["sent"], view["counts"]["failed"]) == (4, 2), view["counts"]
    statuses = {r["recipient"]: r["status"] for r in view["recipients"]["items"]}
    assert statuses[deferred] == "sent"
    assert statuses[refused] == statuses[gone] == "failed"

    # Settled: no second copy turns up later, and the counts stay.
    await asyncio.sleep(2)
    assert await received(sink, deferred) == 1
    assert (await email(gateway, account, email_id))["counts"]["sent"] == 4


async def test_retry_failed_refuses_what_it_cannot_retry(
    gateway: httpx.AsyncClient, sink: httpx.AsyncClient, sent_requests: Requests
):
    account = await new_account(gateway, sent_requests)
    bad = await gateway.post("/emails/not-an-id/retry-failed", headers=account.headers)
    assert bad.status_code == 422, bad.text
    assert "email_id" in [d["field"] for d in bad.json()["error"]["details"]], bad.text
    missing = await gateway.post(f"/emails/{uuid.uuid4()}/retry-failed", headers=account.headers)
    assert missing.status_code == 404, missing.text

    draft = await gateway.post(
        "/compose", json={"subject": "Draft", "text": "Not sent."}, headers=account.headers
    )
    assert draft.status_code == 201, draft.text
    refused = await gateway.post(
        f"/emails/{draft.json()['id']}/retry-failed", headers=account.headers
    )
    assert refused.status_code == 409, refused.text
    assert "this email is draft" in refused.json()["error"]["message"]

    tag = uuid.uuid4().hex[:8]
    sent = await gateway.post(
        "/send",
        json={"to": [f"all{tag}@example.com"], "subject": "Fine", "text": "Delivered."},
        headers=account.headers,
    )
    assert sent.status_code == 202, sent.text
    done = await finished(gateway, account, sent.json()["id"], sent=1)
    assert done["counts"]["failed"] == 0
    nothing = await gateway.post(
        f"/emails/{sent.json()['id']}/retry-failed", headers=account.headers
    )
    assert nothing.status_code == 409, nothing.text
    assert nothing.json()["error"]["code"] == "conflict"

    # Every failure is for good (550): nothing a retry may cure, so nothing is started.
    refused_address = f"refused{tag}@example.com"
    rules = [{"match": refused_address, "action": "reject"}]
    (await sink.put("/api/behaviour", json={"rules": rules})).raise_for_status()
    bounced = await gateway.post(
        "/send",
        json={"to": [refused_address], "subject": "Refused", "text": "Never."},
        headers=account.headers,
    )
    assert bounced.status_code == 202, bounced.text
    failed = await finished(gateway, account, bounced.json()["id"], sent=0)
    assert (failed["status"], failed["counts"]["failed"]) == ("failed", 1)
    permanent = await gateway.post(
        f"/emails/{bounced.json()['id']}/retry-failed", headers=account.headers
    )
    assert permanent.status_code == 409, permanent.text
    assert "a retry may cure" in permanent.json()["error"]["message"]
    after = await email(gateway, account, bounced.json()["id"])
    assert (after["status"], after["counts"]["failed"]) == ("failed", 1)
    assert "nothing to retry" in nothing.json()["error"]["message"]
