"""The attacks the front door must hold against: MFA replay, forged tokens, admin paths, disable."""

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jwt
import pyotp
import pytest

from herald.devinfra.stack import Stack
from herald.events.requests import SendRequested

from .test_auth_accounts import PASSWORD, bearer, confirmed_user, link_token, login

Requests = Callable[..., Awaitable[list[SendRequested]]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _enable_totp(
    gateway: httpx.AsyncClient, tokens: dict[str, Any]
) -> tuple[pyotp.TOTP, list[str]]:
    setup = (await gateway.post("/mfa/totp/setup", headers=bearer(tokens))).json()
    assert setup["otpauth_uri"].startswith("otpauth://totp/Herald:")
    totp = pyotp.TOTP(setup["secret"])
    wrong = await gateway.post(
        "/mfa/totp/enable",
        json={"code": "000000" if totp.now() != "000000" else "111111"},
        headers=bearer(tokens),
    )
    assert wrong.status_code == 422
    enabled = await gateway.post(
        "/mfa/totp/enable", json={"code": totp.now()}, headers=bearer(tokens)
    )
    assert enabled.status_code == 200, enabled.text
    codes = enabled.json()["recovery_codes"]
    assert len(codes) == 10
    return totp, codes


async def test_totp_login_accepts_each_code_once(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    totp, recovery = await _enable_totp(gateway, await login(gateway, email))
    assert (
        await gateway.get(
            "/profile", headers=bearer(await _mfa_login(gateway, email, None, recovery[0]))
        )
    ).json()["mfa_enabled"]

    step = (await gateway.post("/login", json={"email": email, "password": PASSWORD})).json()
    assert step["mfa_required"] is True
    assert "access_token" not in step
    # The code that enabled MFA was used already: replaying it is refused.
    replay = await gateway.post(
        "/login/mfa", json={"mfa_token": step["mfa_token"], "code": totp.now()}
    )
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "invalid_code"
    # A failed step is spent: the next try needs the password again.
    assert (
        await gateway.post("/login/mfa", json={"mfa_token": step["mfa_token"], "code": recovery[1]})
    ).status_code == 401

    # A recovery code works once.
    await _mfa_login(gateway, email, None, recovery[1])
    step = (await gateway.post("/login", json={"email": email, "password": PASSWORD})).json()
    assert (
        await gateway.post("/login/mfa", json={"mfa_token": step["mfa_token"], "code": recovery[1]})
    ).status_code == 401


async def _mfa_login(
    gateway: httpx.AsyncClient, email: str, totp: pyotp.TOTP | None, code: str
) -> dict[str, Any]:
    step = (await gateway.post("/login", json={"email": email, "password": PASSWORD})).json()
    response = await gateway.post("/login/mfa", json={"mfa_token": step["mfa_token"], "code": code})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_totp_disable_needs_password_and_code(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    tokens = await login(gateway, email)
    _, recovery = await _enable_totp(gateway, tokens)
    assert (
        await gateway.post(
            "/mfa/totp/disable",
            json={"password": "wrong-" + PASSWORD, "code": recovery[0]},
            headers=bearer(tokens),
        )
    ).status_code == 401
    assert (
        await gateway.post(
            "/mfa/totp/disable",
            json={"password": PASSWORD, "code": recovery[0]},
            headers=bearer(tokens),
        )
    ).status_code == 204
    assert "access_token" in await login(gateway, email)


def _forge(claims: dict[str, object], header: dict[str, object]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


async def test_forged_tampered_expired_and_alg_none_tokens_are_refused(
    gateway: httpx.AsyncClient, sent_requests: Requests, mint_token: Callable[..., str]
):
    user_id, email = await confirmed_user(gateway, sent_requests)
    good = (await login(gateway, email))["access_token"]
    header, claims, signature = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(claims + "=="))
    payload["role"] = "admin"
    tampered = f"{header}.{_b64(json.dumps(payload).encode())}.{signature}"
    alg_none = _forge(payload, {"alg": "none", "typ": "JWT"})
    hs256 = jwt.encode(
        payload,
        "s" * 32,
        algorithm="HS256",
        headers={"kid": jwt.get_unverified_header(good)["kid"]},
    )
    expired = mint_token(uuid.UUID(user_id), ttl_seconds=-30)
    for token in [tampered, alg_none, hs256, expired, "garbage", good[:-4] + "AAAA"]:
        response = await gateway.get("/profile", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await gateway.get("/profile")).status_code == 401
    assert (
        await gateway.get("/profile", headers={"Authorization": f"Bearer {good}"})
    ).status_code == 200


async def _admin_tokens(gateway: httpx.AsyncClient, infra: Stack) -> dict[str, Any]:
    return await login(gateway, "admin@herald.example", infra.secrets["ADMIN_PASSWORD"])


async def test_non_admins_get_403_on_every_admin_path(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    user_id, email = await confirmed_user(gateway, sent_requests)
    headers = bearer(await login(gateway, email))
    calls = [
        ("GET", "/admin/users", None),
        ("GET", f"/admin/users/{user_id}", None),
        ("PATCH", f"/admin/users/{user_id}", {"role": "admin"}),
        ("POST", f"/admin/users/{user_id}/reset-password", None),
        ("GET", "/admin/audit", None),
    ]
    for method, path, body in calls:
        response = await gateway.request(method, path, json=body, headers=headers)
        assert response.status_code == 403, (method, path, response.text)
        assert (await gateway.request(method, path, json=body)).status_code == 401


async def test_admin_finds_disables_and_resets_a_user(
    gateway: httpx.AsyncClient, sent_requests: Requests, infra: Stack, platform: Stack
):
    user_id, email = await confirmed_user(gateway, sent_requests)
    user_tokens = await login(gateway, email)
    admin = bearer(await _admin_tokens(gateway, infra))

    found = (await gateway.get("/admin/users", params={"q": email[:12]}, headers=admin)).json()
    assert [u["id"] for u in found["items"]] == [user_id]
    assert (await gateway.get(f"/admin/users/{user_id}", headers=admin)).json()[
        "status"
    ] == "active"

    disabled = await gateway.patch(
        f"/admin/users/{user_id}", json={"disabled": True, "daily_send_quota": 500}, headers=admin
    )
    assert disabled.status_code == 200
    assert disabled.json()["status"] == "disabled"
    assert disabled.json()["daily_send_quota"] == 500
    # The user's still-unexpired token stops working within seconds: auth verifies it itself,
    # from the user.changed event, like every other service.
    await _until_refused(platform.url("auth") + "/profile", user_tokens)
    assert (
        await gateway.post("/login", json={"email": email, "password": PASSWORD})
    ).status_code == 403

    enabled = await gateway.patch(
        f"/admin/users/{user_id}", json={"disabled": False}, headers=admin
    )
    assert enabled.json()["status"] == "active"
    fresh = await login(gateway, email)
    assert (await gateway.get("/profile", headers=bearer(fresh))).status_code == 200

    assert (
        await gateway.post(f"/admin/users/{user_id}/reset-password", headers=admin)
    ).status_code == 202
    resets = [m for m in await sent_requests(email, at_least=2) if "reset" in m.subject.lower()]
    assert resets
    await _until_refused(platform.url("auth") + "/profile", fresh)
    new_password = "admin-set-" + PASSWORD
    assert (
        await gateway.post(
            "/password/reset",
            json={"token": link_token(resets[-1], "/password/reset"), "new_password": new_password},
        )
    ).status_code == 204
    await login(gateway, email, new_password)

    audit = (await gateway.get("/admin/audit", params={"user_id": user_id}, headers=admin)).json()[
        "items"
    ]
    actions = [entry["action"] for entry in audit]
    assert actions.count("user_updated") == 2
    assert "password_reset_requested" in actions
    assert all(e["target_email"] == email for e in audit)


async def _until_refused(url: str, tokens: dict[str, Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while (await client.get(url, headers=bearer(tokens))).status_code != 401:
            assert time.monotonic() < deadline, f"token still accepted at {url}"
            await asyncio.sleep(0.1)


async def test_api_keys_work_at_the_gateway_until_revoked(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    tokens = await login(gateway, email)
    created = await gateway.post(
        "/api-keys", json={"name": "billing", "scope": "full"}, headers=bearer(tokens)
    )
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("hk_")
    listed = (await gateway.get("/api-keys", headers=bearer(tokens))).json()
    assert [k["name"] for k in listed] == ["billing"]
    assert "key" not in listed[0]

    as_key = {"Authorization": f"Bearer {key}"}
    assert (await gateway.get("/profile", headers=as_key)).json()["email"] == email
    send_only = (
        await gateway.post("/api-keys", json={"name": "s", "scope": "send"}, headers=bearer(tokens))
    ).json()["key"]
    assert (
        await gateway.get("/profile", headers={"Authorization": f"Bearer {send_only}"})
    ).status_code == 403

    assert (
        await gateway.delete(f"/api-keys/{created.json()['id']}", headers=bearer(tokens))
    ).status_code == 204
    deadline = time.monotonic() + 15
    while (await gateway.get("/profile", headers=as_key)).status_code != 401:
        assert time.monotonic() < deadline, "revoked key still works"
        await asyncio.sleep(0.5)
    assert (
        await gateway.get("/profile", headers={"Authorization": "Bearer hk_bogus_key"})
    ).status_code == 401


@pytest.mark.parametrize("field", ["email", "password"])
async def test_login_input_is_never_a_server_error(gateway: httpx.AsyncClient, field: str):
    body = {"email": "a@example.com", "password": "x"}
    for value in ["", "\x00", "' OR 1=1 --", "<script>", "é" * 2000, None, 5]:
        response = await gateway.post(
            "/login",
            json=body | {field: value},
            headers={"X-Forwarded-For": f"10.{uuid.uuid4().int % 250}.0.1"},
        )
        assert response.status_code in (401, 422, 429), (value, response.text)
