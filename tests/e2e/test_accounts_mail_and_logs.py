"""Account mails as a person gets them (through the dispatcher into the SMTP sink), and the
secrets of every account flow kept out of every service's log."""

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pyotp

from herald.devinfra.stack import SERVICES, Stack
from tests.auth.test_auth_accounts import PASSWORD, bearer, login, new_identity


async def _mail(sink: httpx.AsyncClient, to: str, subject: str, timeout: float = 60) -> str:
    """The text of the newest message to `to` whose subject contains `subject`."""
    deadline = time.monotonic() + timeout
    while True:
        items = (await sink.get("/api/messages", params={"to": to, "limit": 20})).json()["items"]
        for item in items:
            message = (await sink.get(f"/api/messages/{item['id']}")).json()
            if subject.lower() in (message["subject"] or "").lower():
                return str(message["text"])
        assert time.monotonic() < deadline, f"no '{subject}' mail to {to} in the sink"
        await asyncio.sleep(0.3)


def _link(text: str, path: str) -> str:
    return next(word for word in text.split() if path in word)


def _token(link: str) -> str:
    return parse_qs(urlparse(link).query)["token"][0]


async def _signed_up(gateway: httpx.AsyncClient, sink: httpx.AsyncClient) -> str:
    """A new user confirmed from the link in their mail; their address."""
    username, email = new_identity()
    response = await gateway.post(
        "/signup", json={"username": username, "email": email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    link = _link(await _mail(sink, email, "confirm"), "/signup/confirm")
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as browser:
        assert (await browser.get(link)).status_code == 200
    return email


async def test_a_password_reset_works_from_the_delivered_mail(
    gateway: httpx.AsyncClient, sink: httpx.AsyncClient, platform: Stack
):
    email = await _signed_up(gateway, sink)
    assert (await gateway.post("/password/forgot", json={"email": email})).status_code == 202
    link = _link(await _mail(sink, email, "reset"), "/password/reset")
    assert link.startswith(platform.url("gateway") + "/password/reset?token=")

    new_password = "from-the-mail-" + PASSWORD
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as browser:
        page = await browser.get(link, headers={"Accept": "text/html"})
        assert page.status_code == 200
        assert "<form" in page.text
        # What the page's form posts: the token from the link and the new password.
        done = await browser.post(
            platform.url("gateway") + "/password/reset",
            data={"token": _token(link), "new_password": new_password},
            headers={"Accept": "text/html"},
        )
        assert done.status_code == 200, done.text
        again = await browser.post(
            platform.url("gateway") + "/password/reset",
            data={"token": _token(link), "new_password": "again-" + new_password},
            headers={"Accept": "text/html"},
        )
        assert again.status_code == 404
    await login(gateway, email, new_password)
    assert (
        await gateway.post("/login", json={"email": email, "password": PASSWORD})
    ).status_code == 401


async def test_no_secret_of_an_account_flow_reaches_a_service_log(
    gateway: httpx.AsyncClient, sink: httpx.AsyncClient, platform: Stack
):
    secrets: dict[str, str] = {"password": PASSWORD}
    email = await _signed_up(gateway, sink)
    confirm = _link(await _mail(sink, email, "confirm"), "/signup/confirm")
    secrets["confirmation token"] = _token(confirm)

    wrong = "not-my-password-" + uuid.uuid4().hex[:8]
    secrets["wrong password"] = wrong
    assert (
        await gateway.post("/login", json={"email": email, "password": wrong})
    ).status_code == 401
    tokens = await login(gateway, email)
    refreshed = (
        await gateway.post("/token/refresh", json={"refresh_token": tokens["refresh_token"]})
    ).json()
    _remember_tokens(secrets, "login", tokens)
    _remember_tokens(secrets, "refresh", refreshed)

    key = (
        await gateway.post(
            "/api-keys", json={"name": "logs", "scope": "full"}, headers=bearer(tokens)
        )
    ).json()["key"]
    secrets["API key"] = key
    assert (
        await gateway.get("/profile", headers={"Authorization": f"Bearer {key}"})
    ).status_code == 200

    setup = (await gateway.post("/mfa/totp/setup", headers=bearer(refreshed))).json()
    secrets["TOTP secret"] = setup["secret"]
    totp = pyotp.TOTP(setup["secret"])
    codes = (
        await gateway.post("/mfa/totp/enable", json={"code": totp.now()}, headers=bearer(refreshed))
    ).json()["recovery_codes"]
    secrets |= {f"recovery code {i}": code for i, code in enumerate(codes)}
    step = (await gateway.post("/login", json={"email": email, "password": PASSWORD})).json()
    secrets["MFA step token"] = step["mfa_token"]
    mfa = await gateway.post("/login/mfa", json={"mfa_token": step["mfa_token"], "code": codes[0]})
    assert mfa.status_code == 200, mfa.text
    _remember_tokens(secrets, "MFA login", mfa.json())

    assert (await gateway.post("/password/forgot", json={"email": email})).status_code == 202
    reset = _token(_link(await _mail(sink, email, "reset"), "/password/reset"))
    secrets["reset token"] = reset
    new_password = "after-reset-" + PASSWORD
    secrets["new password"] = new_password
    assert (
        await gateway.post("/password/reset", json={"token": reset, "new_password": new_password})
    ).status_code == 204
    step = (await gateway.post("/login", json={"email": email, "password": new_password})).json()
    final = await gateway.post(
        "/login/mfa", json={"mfa_token": step["mfa_token"], "code": codes[1]}
    )
    _remember_tokens(secrets, "last login", final.json())
    changed = "changed-" + PASSWORD
    secrets["changed password"] = changed
    assert (
        await gateway.post(
            "/profile/password",
            json={"current_password": new_password, "new_password": changed},
            headers=bearer(final.json()),
        )
    ).status_code == 204

    await asyncio.sleep(1.5)  # let every service write out what it logs about these requests
    leaks = []
    for name in SERVICES:
        log = (platform.logs_dir / f"{name}.log").read_text(errors="replace")
        assert "service started" in log, name
        leaks += [f"{what} in {name}.log" for what, value in secrets.items() if value in log]
        # A slice of a link token is a slice of the secret (idempotency keys, say).
        leaks += [
            f"part of the {what} in {name}.log"
            for what in ("confirmation token", "reset token")
            if secrets[what][:16] in log
        ]
    assert not leaks, leaks


def _remember_tokens(secrets: dict[str, str], when: str, tokens: dict[str, Any]) -> None:
    secrets[f"access token ({when})"] = tokens["access_token"]
    # The signature alone identifies (and with the claims, replays) a token.
    secrets[f"access token signature ({when})"] = tokens["access_token"].rsplit(".", 1)[1]
    secrets[f"refresh token ({when})"] = tokens["refresh_token"]
