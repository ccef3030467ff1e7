"""The gateway in front of the running platform: a service down, administrators' views."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from herald.devinfra.stack import BACKEND_SERVICES, Stack
from tests.conftest import TokenMaker
from tests.gateway.conftest import Account


async def test_a_stopped_service_gives_a_prompt_503_while_the_rest_works(
    platform: Stack, gateway: httpx.AsyncClient, account: Account
):
    await platform.stop_service("contacts")
    try:
        started = time.monotonic()
        down = await gateway.get("/contacts", headers=account.headers)
        assert down.status_code == 503
        assert down.json()["error"] == {
            "code": "service_unavailable",
            "message": "the contacts service is unavailable",
            "details": [],
        }
        assert time.monotonic() - started < 3
        profile = await gateway.get("/profile", headers=account.headers)
        assert profile.status_code == 200, profile.text
        assert profile.json()["email"] == account.email
    finally:
        await platform.start_service("contacts")
        await platform.wait_ready(60, ["contacts"])
    assert (await gateway.get("/contacts", headers=account.headers)).status_code != 503


async def test_the_gateway_refuses_unauthenticated_calls_before_the_services(
    gateway: httpx.AsyncClient,
):
    for method, path in (("GET", "/contacts"), ("POST", "/compose"), ("GET", "/reports")):
        response = await gateway.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"


async def test_admin_system_shows_every_service(gateway: httpx.AsyncClient, mint_token: TokenMaker):
    admin = {"Authorization": f"Bearer {mint_token(role='admin')}"}
    response = await gateway.get("/admin/system", headers=admin)
    assert response.status_code == 200, response.text
    view = response.json()
    by_name = {s["name"]: s for s in view["services"]}
    assert set(by_name) == set(BACKEND_SERVICES)
    for name, status in by_name.items():
        assert status["healthy"], (name, status)
        assert status["version"] == "0.1.0"
        assert status["checks"]["database"] == "ok", (name, status)
        assert status["schema_bytes"], name
        assert status["outbox_backlog"] is not None, name
    assert set(view["database"]["schemas"]) == set(BACKEND_SERVICES)
    assert view["database"]["total_bytes"] == sum(view["database"]["schemas"].values())
    assert set(view["outbox_backlog"]) == set(BACKEND_SERVICES)
    for lag in view["consumer_lag"]:
        assert lag["service"] in BACKEND_SERVICES
        assert lag["lag"] >= 0
    generated = datetime.fromisoformat(view["generated_at"])
    assert abs((datetime.now(UTC) - generated).total_seconds()) < 60


async def test_admin_views_are_for_administrators_only(
    gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    user = {"Authorization": f"Bearer {mint_token()}"}
    send_only = {"Authorization": f"Bearer {mint_token(role='admin', scope='send')}"}
    for path in ("/admin/system", "/admin/usage"):
        assert (await gateway.get(path)).status_code == 401
        refused = await gateway.get(path, headers=user)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden"
        assert (await gateway.get(path, headers=send_only)).status_code == 403


async def test_admin_usage_validates_its_range(gateway: httpx.AsyncClient, mint_token: TokenMaker):
    admin = {"Authorization": f"Bearer {mint_token(role='admin')}"}
    cases = [
        ({"from": "2026-02-01", "to": "2026-01-01"}, "from"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "to"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
    ]
    for params, field in cases:
        response = await gateway.get("/admin/usage", params=params, headers=admin)
        assert response.status_code == 422, (params, response.text)
        assert field in [d["field"] for d in response.json()["error"]["details"]], response.text


async def _send_and_wait(
    gateway: httpx.AsyncClient, account: Account, to: list[str]
) -> dict[str, Any]:
    """Send inline to `to` through the gateway; the email once every recipient has an outcome."""
    sent = await gateway.post(
        "/send",
        json={"to": to, "subject": "Figures", "text": "Counted once."},
        headers=account.headers,
    )
    assert sent.status_code == 202, sent.text
    deadline = time.monotonic() + 60
    while True:
        email = (await gateway.get(f"/emails/{sent.json()['id']}", headers=account.headers)).json()
        if email["status"] in ("sent", "failed"):
            return dict(email)
        assert time.monotonic() < deadline, email
        await asyncio.sleep(0.2)


async def test_admin_usage_reports_from_the_campaign_service(
    gateway: httpx.AsyncClient, mint_token: TokenMaker, account: Account
):
    admin = {"Authorization": f"Bearer {mint_token(role='admin')}"}
    account_id = account.user_id  # a signed-up user is an account of their own
    tag = uuid.uuid4().hex[:8]
    email = await _send_and_wait(gateway, account, [f"u{tag}-{n}@example.com" for n in range(3)])
    assert email["counts"] == {"queued": 3, "sent": 3, "failed": 0}, email
    # The account's day is UTC (its profile's timezone); a day either side covers midnight.
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=6), today + timedelta(days=1)
    response = await gateway.get(
        "/admin/usage", params={"from": start.isoformat(), "to": end.isoformat()}, headers=admin
    )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["from"] == start.isoformat()
    assert report["to"] == end.isoformat()
    mine = [day for day in report["days"] if day["account_id"] == account_id]
    assert [(d["sent"], d["failed"]) for d in mine] == [(3, 0)], report["days"]
    assert start.isoformat() <= mine[0]["day"] <= end.isoformat()
    [quota] = [q for q in report["quotas"] if q["account_id"] == account_id]
    assert quota["used_today"] == 3, quota
    # Top senders: at most ten, most recipients first, each the sum of its days.
    top = report["top_senders"]
    assert 1 <= len(top) <= 10
    assert [t["sent"] for t in top] == sorted((t["sent"] for t in top), reverse=True)
    for sender in top:
        days = [d for d in report["days"] if d["account_id"] == sender["account_id"]]
        assert sender["sent"] == sum(d["sent"] for d in days), sender
        assert sender["failed"] == sum(d["failed"] for d in days), sender
    too_long = await gateway.get(
        "/admin/usage", params={"from": "2024-01-01", "to": "2025-06-01"}, headers=admin
    )
    assert too_long.status_code == 422
    assert [d["field"] for d in too_long.json()["error"]["details"]] == ["to"]


async def test_the_campaign_service_checks_the_usage_range_itself(platform: Stack):
    internal = {"X-Internal-Token": platform.secrets["INTERNAL_TOKEN"]}
    cases = [
        ({"from": "2026-02-30", "to": "2026-03-01"}, "from"),
        ({"from": "2026-03-01", "to": "soon"}, "to"),
        ({"from": "2026-03-01"}, "to"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "from"),
        ({"from": "2024-01-01", "to": "2025-06-01"}, "to"),
    ]
    async with httpx.AsyncClient(base_url=platform.url("campaign"), timeout=10) as client:
        assert (await client.get("/internal/usage", params=cases[0][0])).status_code in (401, 403)
        for params, field in cases:
            response = await client.get("/internal/usage", params=params, headers=internal)
            assert response.status_code == 422, (params, response.text)
            fields = [d["field"] for d in response.json()["error"]["details"]]
            assert fields == [field], (params, response.text)
        fine = await client.get(
            "/internal/usage", params={"from": "2026-03-01", "to": "2026-03-01"}, headers=internal
        )
        assert fine.status_code == 200, fine.text
        assert set(fine.json()) == {"days", "quotas"}


async def _figures(gateway: httpx.AsyncClient, admin: dict[str, str]) -> dict[str, Any]:
    response = await gateway.get("/admin/system", headers=admin)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def test_admin_system_counts_what_was_delivered(
    gateway: httpx.AsyncClient,
    mint_token: TokenMaker,
    account: Account,
    sink: httpx.AsyncClient,
):
    admin = {"Authorization": f"Bearer {mint_token(role='admin')}"}
    tag = uuid.uuid4().hex[:8]
    refused = f"refused{tag}@example.com"
    rule = {"rules": [{"match": refused, "action": "reject"}], "refuse_connections": False}
    (await sink.put("/api/behaviour", json=rule)).raise_for_status()
    before = await _figures(gateway, admin)
    assert before["messages"] is not None, before
    email = await _send_and_wait(
        gateway, account, [f"ok{tag}-1@example.com", f"ok{tag}-2@example.com", refused]
    )
    assert email["counts"] == {"queued": 3, "sent": 2, "failed": 1}, email
    after = await _figures(gateway, admin)
    messages = after["messages"]
    # Counted from the dispatcher's records: this send is in both windows, nothing else failed.
    assert messages["last_minute"]["sent"] >= 2, messages
    assert messages["last_minute"]["failed"] >= 1, messages
    assert messages["last_hour"]["sent"] - before["messages"]["last_hour"]["sent"] >= 2
    assert messages["last_hour"]["failed"] - before["messages"]["last_hour"]["failed"] == 1
    assert messages["last_hour"]["sent"] >= messages["last_minute"]["sent"]
    assert isinstance(messages["awaiting_retry"], int)
    assert isinstance(messages["last_hour"]["deferred"], int), messages
    # Tracking consumed the three outcomes (and the fan-out) within the last minute.
    assert after["tracking_events_per_minute"] >= 3, after["tracking_events_per_minute"]
    by_name = {s["name"]: s for s in after["services"]}
    assert by_name["dispatcher"]["figures"]["messages"] == messages
    assert (
        by_name["tracking"]["figures"]["events_per_minute"] == after["tracking_events_per_minute"]
    )


async def test_a_restarted_service_is_reached_again_at_once(
    platform: Stack, gateway: httpx.AsyncClient, account: Account
):
    async def calls() -> list[int]:
        answers = await asyncio.gather(
            *(gateway.get("/contacts", headers=account.headers) for _ in range(8))
        )
        return [a.status_code for a in answers]

    # Several pooled connections to contacts, then a restart closes every one of them.
    assert await calls() == [200] * 8
    await platform.stop_service("contacts")
    await platform.start_service("contacts")
    await platform.wait_ready(60, ["contacts"])
    assert await calls() == [200] * 8
