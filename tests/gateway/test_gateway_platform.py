"""The gateway in front of the running platform: a service down, administrators' views."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, date, datetime, timedelta

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


async def test_admin_usage_reports_from_the_campaign_service(
    gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    admin = {"Authorization": f"Bearer {mint_token(role='admin')}"}
    today = date.today()
    response = await gateway.get(
        "/admin/usage",
        params={"from": (today - timedelta(days=6)).isoformat(), "to": today.isoformat()},
        headers=admin,
    )
    if response.status_code == 503:
        # Until the campaign service serves GET /internal/usage, the answer says so plainly.
        assert response.json()["error"]["code"] == "usage_unavailable", response.text
        return
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["from"] == (today - timedelta(days=6)).isoformat()
    assert report["to"] == today.isoformat()
    assert len(report["top_senders"]) <= 10
    for day in report["days"]:
        uuid.UUID(day["account_id"])
        assert report["from"] <= day["day"] <= report["to"]
