"""Accounts end to end through the gateway: sign-up, confirmation, login, sessions, profile."""

import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import httpx
import pytest

from herald.devinfra.stack import Stack
from herald.events.requests import SendRequested

PASSWORD = "plum-orbit-candle-92-harbor"
Requests = Callable[..., Awaitable[list[SendRequested]]]


def new_identity() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"user{tag}", f"user{tag}@example.com"


def link_token(request: SendRequested, path: str) -> str:
    assert request.text is not None
    link = next(word for word in request.text.split() if path in word)
    return parse_qs(urlparse(link).query)["token"][0]


async def signup(gateway: httpx.AsyncClient, password: str = PASSWORD) -> tuple[str, str, str]:
    username, email = new_identity()
    response = await gateway.post(
        "/signup", json={"username": username, "email": email, "password": password}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], username, email


async def confirmed_user(gateway: httpx.AsyncClient, sent_requests: Requests) -> tuple[str, str]:
    """A signed-up user whose address is confirmed: (user id, email)."""
    user_id, _, email = await signup(gateway)
    [mail] = await sent_requests(email)
    response = await gateway.get(
        "/signup/confirm", params={"token": link_token(mail, "/signup/confirm")}
    )
    assert response.status_code == 200, response.text
    return user_id, email


async def login(gateway: httpx.AsyncClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    response = await gateway.post("/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return dict(response.json())


def bearer(tokens: dict[str, Any]) -> dict[str, Any]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_signup_validates_each_field(gateway: httpx.AsyncClient):
    username, email = new_identity()
    cases = [
        ({"username": username, "email": "not-an-address", "password": PASSWORD}, "email"),
        ({"username": "x", "email": email, "password": PASSWORD}, "username"),
        ({"username": username, "email": email, "password": "password123456"}, "password"),
        ({"username": username, "email": email, "password": "short"}, "password"),
        ({"username": username, "email": email, "password": f"{username}-and-more"}, "password"),
        ({"username": username, "email": email}, "password"),
    ]
    for body, field in cases:
        response = await gateway.post("/signup", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in [d["field"] for d in response.json()["error"]["details"]], response.text


async def test_signup_answers_the_contract_and_refuses_duplicates(gateway: httpx.AsyncClient):
    username, email = new_identity()
    response = await gateway.post(
        "/signup", json={"username": username.upper(), "email": email.upper(), "password": PASSWORD}
    )
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "id": body["id"],
        "username": username,
        "email": email,
        "email_verified": False,
    }
    again = await gateway.post(
        "/signup", json={"username": "other" + username, "email": email, "password": PASSWORD}
    )
    assert again.status_code == 409
    assert again.json()["error"]["details"][0]["field"] == "email"
    other_email = "x" + email
    again = await gateway.post(
        "/signup", json={"username": username, "email": other_email, "password": PASSWORD}
    )
    assert again.status_code == 409
    assert again.json()["error"]["details"][0]["field"] == "username"


async def test_confirmation_link_is_single_use_and_expires(
    gateway: httpx.AsyncClient, sent_requests: Requests, infra: Stack
):
    _, _, email = await signup(gateway)
    refused = await gateway.post("/login", json={"email": email, "password": PASSWORD})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "email_not_verified"

    [mail] = await sent_requests(email)
    assert mail.system is True
    assert mail.subject == "Confirm your email address"
    token = link_token(mail, "/signup/confirm")
    page = await gateway.get(
        "/signup/confirm", params={"token": token}, headers={"Accept": "text/html"}
    )
    assert page.status_code == 200
    assert "confirmed" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert (await gateway.get("/signup/confirm", params={"token": token})).status_code == 404
    await login(gateway, email)

    # An expired link does nothing.
    _, _, late = await signup(gateway)
    [late_mail] = await sent_requests(late)
    conn = await asyncpg.connect(infra.database_url)
    try:
        await conn.execute(
            "UPDATE auth.action_tokens SET expires_at = now() - interval '1 second'"
            " WHERE user_id = (SELECT id FROM auth.users WHERE email = $1)",
            late,
        )
    finally:
        await conn.close()
    expired = await gateway.get(
        "/signup/confirm", params={"token": link_token(late_mail, "/signup/confirm")}
    )
    assert expired.status_code == 404


async def test_resend_confirmation_does_not_reveal_accounts(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, _, email = await signup(gateway)
    known = await gateway.post("/signup/resend-confirmation", json={"email": email})
    unknown = await gateway.post("/signup/resend-confirmation", json={"email": "nobody-" + email})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    assert len(await sent_requests(email, at_least=2)) == 2


async def test_wrong_credentials_look_the_same_for_known_and_unknown_accounts(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    unknown = "nobody-" + email

    async def attempt(address: str) -> tuple[float, httpx.Response]:
        started = time.perf_counter()
        response = await gateway.post(
            "/login",
            json={"email": address, "password": "wrong-" + PASSWORD},
            headers={"X-Forwarded-For": f"10.9.{uuid.uuid4().int % 250}.1"},
        )
        return time.perf_counter() - started, response

    known_times, unknown_times = [], []
    for _ in range(4):  # below the lockout threshold
        t_known, r_known = await attempt(email)
        t_unknown, r_unknown = await attempt(unknown)
        assert r_known.status_code == r_unknown.status_code == 401
        assert r_known.json() == r_unknown.json()
        known_times.append(t_known)
        unknown_times.append(t_unknown)
    ratio = statistics.median(known_times) / statistics.median(unknown_times)
    assert 0.33 < ratio < 3, (known_times, unknown_times)


async def test_repeated_failures_lock_the_account_until_reset(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    for _ in range(5):
        assert (
            await gateway.post("/login", json={"email": email, "password": "nope-" + PASSWORD})
        ).status_code == 401
    locked = await gateway.post("/login", json={"email": email, "password": PASSWORD})
    assert locked.status_code == 429
    assert int(locked.headers["retry-after"]) >= 1
    assert locked.json()["error"]["code"] == "too_many_attempts"

    assert (await gateway.post("/password/forgot", json={"email": email})).status_code == 202
    resets = [m for m in await sent_requests(email, at_least=2) if "reset" in m.subject.lower()]
    new_password = "second-" + PASSWORD
    response = await gateway.post(
        "/password/reset",
        json={"token": link_token(resets[-1], "/password/reset"), "new_password": new_password},
    )
    assert response.status_code == 204, response.text
    await login(gateway, email, new_password)
    assert (
        await gateway.post("/login", json={"email": email, "password": PASSWORD})
    ).status_code == 401


async def test_refresh_rotates_and_reuse_revokes_the_session(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    first = await login(gateway, email)
    assert first["token_type"] == "bearer"
    assert first["expires_in"] > 0
    second = (
        await gateway.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    ).json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await gateway.get("/profile", headers=bearer(second))).status_code == 200

    reused = await gateway.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401
    assert reused.json()["error"]["code"] == "refresh_token_reused"
    # The thief's copy and the owner's current token die together.
    assert (
        await gateway.post("/token/refresh", json={"refresh_token": second["refresh_token"]})
    ).status_code == 401


async def test_logout_and_sessions(gateway: httpx.AsyncClient, sent_requests: Requests):
    _, email = await confirmed_user(gateway, sent_requests)
    laptop, phone = await login(gateway, email), await login(gateway, email)
    listed = (await gateway.get("/sessions", headers=bearer(laptop))).json()
    assert len(listed) == 2
    assert [s["current"] for s in listed].count(True) == 1
    phone_id = next(s["id"] for s in listed if not s["current"])
    assert (
        await gateway.delete(f"/sessions/{phone_id}", headers=bearer(laptop))
    ).status_code == 204
    assert (
        await gateway.post("/token/refresh", json={"refresh_token": phone["refresh_token"]})
    ).status_code == 401
    assert (
        await gateway.delete(f"/sessions/{phone_id}", headers=bearer(laptop))
    ).status_code == 404

    assert (await gateway.post("/logout", headers=bearer(laptop))).status_code == 204
    assert (
        await gateway.post("/token/refresh", json={"refresh_token": laptop["refresh_token"]})
    ).status_code == 401


async def test_one_user_cannot_reach_another_users_objects(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, alice = await confirmed_user(gateway, sent_requests)
    _, bob = await confirmed_user(gateway, sent_requests)
    alice_tokens, bob_tokens = await login(gateway, alice), await login(gateway, bob)
    alice_session = (await gateway.get("/sessions", headers=bearer(alice_tokens))).json()[0]["id"]
    key = (await gateway.post("/api-keys", json={"name": "a"}, headers=bearer(alice_tokens))).json()
    assert (
        await gateway.delete(f"/sessions/{alice_session}", headers=bearer(bob_tokens))
    ).status_code == 404
    assert (
        await gateway.delete(f"/api-keys/{key['id']}", headers=bearer(bob_tokens))
    ).status_code == 404
    assert (await gateway.get("/api-keys", headers=bearer(bob_tokens))).json() == []
    assert (await gateway.get("/profile", headers=bearer(bob_tokens))).json()["email"] == bob


async def test_profile_read_update_and_email_change(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    tokens = await login(gateway, email)
    profile = (await gateway.get("/profile", headers=bearer(tokens))).json()
    assert profile["email"] == email
    assert profile["mfa_enabled"] is False
    assert profile["timezone"] == "UTC"

    bad = await gateway.put("/profile", json={"timezone": "Mars/Olympus"}, headers=bearer(tokens))
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "timezone"
    header_injection = await gateway.put(
        "/profile", json={"default_sender_name": "A\r\nBcc: x@y.z"}, headers=bearer(tokens)
    )
    assert header_injection.status_code == 422
    for required in ("username", "timezone"):
        cleared = await gateway.put("/profile", json={required: None}, headers=bearer(tokens))
        assert cleared.status_code == 422, cleared.text
        assert cleared.json()["error"]["details"][0]["field"] == required

    new_email = "new-" + email
    updated = await gateway.put(
        "/profile",
        json={
            "display_name": "Ada <b>L</b>",
            "timezone": "Europe/Paris",
            "default_sender_name": "Ada",
            "email": new_email,
        },
        headers=bearer(tokens),
    )
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert body["display_name"] == "Ada <b>L</b>"
    assert body["timezone"] == "Europe/Paris"
    assert body["email"] == email
    assert body["pending_email"] == new_email
    [confirm] = await sent_requests(new_email)
    assert (
        await gateway.get(
            "/signup/confirm", params={"token": link_token(confirm, "/signup/confirm")}
        )
    ).status_code == 200
    assert (await gateway.get("/profile", headers=bearer(tokens))).json()["email"] == new_email
    await login(gateway, new_email)


async def test_password_change_ends_other_sessions(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    here, elsewhere = await login(gateway, email), await login(gateway, email)
    wrong = await gateway.post(
        "/profile/password",
        json={"current_password": "x" * 12, "new_password": "third-" + PASSWORD},
        headers=bearer(here),
    )
    assert wrong.status_code == 401
    weak = await gateway.post(
        "/profile/password",
        json={"current_password": PASSWORD, "new_password": "qwertyuiop123"},
        headers=bearer(here),
    )
    assert weak.status_code == 422
    ok = await gateway.post(
        "/profile/password",
        json={"current_password": PASSWORD, "new_password": "third-" + PASSWORD},
        headers=bearer(here),
    )
    assert ok.status_code == 204
    assert (
        await gateway.post("/token/refresh", json={"refresh_token": elsewhere["refresh_token"]})
    ).status_code == 401
    assert (
        await gateway.post("/token/refresh", json={"refresh_token": here["refresh_token"]})
    ).status_code == 200


async def test_reset_link_is_single_use_and_form_works(
    gateway: httpx.AsyncClient, sent_requests: Requests
):
    _, email = await confirmed_user(gateway, sent_requests)
    await gateway.post("/password/forgot", json={"email": email})
    [reset] = [m for m in await sent_requests(email, at_least=2) if "reset" in m.subject.lower()]
    token = link_token(reset, "/password/reset")
    page = await gateway.get("/password/reset", params={"token": token})
    assert page.status_code == 200
    assert "<form" in page.text
    assert "content-security-policy" in page.headers
    done = await gateway.post(
        "/password/reset",
        data={"token": token, "new_password": "fourth-" + PASSWORD},
        headers={"Accept": "text/html"},
    )
    assert done.status_code == 200
    assert "Password changed" in done.text
    again = await gateway.post(
        "/password/reset", json={"token": token, "new_password": "fifth-" + PASSWORD}
    )
    assert again.status_code == 404
    await login(gateway, email, "fourth-" + PASSWORD)


@pytest.mark.parametrize("path", ["/signup", "/login", "/token/refresh", "/password/reset"])
async def test_malformed_bodies_are_clear_4xx(gateway: httpx.AsyncClient, path: str):
    for content, kind in [
        (b"{not json", "application/json"),
        (b"[]", "application/json"),
        (b"\xff\xfe", "application/json"),
    ]:
        response = await gateway.post(path, content=content, headers={"Content-Type": kind})
        assert 400 <= response.status_code < 500, (path, content, response.text)
        assert "error" in response.json()
