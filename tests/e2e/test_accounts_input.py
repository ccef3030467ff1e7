"""Hostile text at the account-facing endpoints: NUL characters are named like any invalid
field, and forged link tokens (non-ASCII signatures) are a 4xx, never a 500."""

import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import httpx
import pytest

from herald.devinfra.stack import Stack
from herald.events.requests import SendRequested
from herald.links import LinkSigner, UnsubscribeToken
from tests.auth.test_auth_accounts import bearer, confirmed_user, login

Requests = Callable[..., Awaitable[list[SendRequested]]]


def _field_error(response: httpx.Response) -> tuple[str, list[str]]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    return error["code"], [d["field"] for d in error["details"]]


async def test_nul_in_text_is_a_422_naming_the_field(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, email = await confirmed_user(gateway, sent_requests)
    headers = bearer(await login(gateway, email))
    # Each of these reaches PostgreSQL, which cannot store NUL in text.
    key = await gateway.post("/api-keys", json={"name": "ci\x00key"}, headers=headers)
    assert _field_error(key) == ("invalid_text", ["name"])
    assert "name" in key.json()["error"]["message"]
    profile = await gateway.put(
        "/profile", json={"timezone": "UTC", "display_name": "Ada\x00"}, headers=headers
    )
    # Auth's own schema may refuse control characters first: either way the field is named.
    assert _field_error(profile)[1] == ["display_name"]
    listed = await gateway.post(
        "/lists", json={"name": "fine", "description": "bad\x00"}, headers=headers
    )
    assert _field_error(listed) == ("invalid_text", ["description"])

    admin = await login(gateway, "admin@herald.example", platform.secrets["ADMIN_PASSWORD"])
    search = await gateway.get("/admin/users", params={"q": "ad\x00min"}, headers=bearer(admin))
    assert _field_error(search) == ("invalid_text", ["q"])


def test_a_non_ascii_signature_is_no_error_for_the_signer():
    signer = LinkSigner({"k1": b"a-test-signing-key"})
    token = signer.sign("unsubscribe", UnsubscribeToken(a=uuid.uuid4(), r="x@example.com"))
    payload, kid, mac = token.split(".")
    assert signer.verify("unsubscribe", token, UnsubscribeToken) is not None
    for forged in (f"{payload}.{kid}.{mac[:-1]}é", f"{payload}.{kid}.\udc80", f"é{token}"):
        assert signer.verify("unsubscribe", forged, UnsubscribeToken) is None


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
async def test_a_forged_unsubscribe_token_with_non_ascii_is_a_clean_404(
    gateway: httpx.AsyncClient, platform: Stack, accept: str
):
    # A genuine-looking payload and key id, and a signature that is not base64url.
    payload = "eyJhIjoiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIiwiciI6IngifQ"
    kid = platform.secrets["LINK_SIGNING_KEYS"].split(",")[0].partition(":")[0]
    for mac in ("AAAAAAAAAAAAAAAAAAAAAé", "ü" * 22, "%FF%FE"):
        path = f"/unsubscribe/{payload}.{kid}.{quote(mac, safe='%')}"
        for base in (platform.url("gateway"), platform.url("contacts")):
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                for method in ("GET", "POST"):
                    response = await client.request(method, path, headers={"Accept": accept})
                    # 404 for a forged token; 400 where the path is not even UTF-8.
                    assert response.status_code in (400, 404), (base, method, mac, response.text)
                    if response.headers["content-type"].startswith("application/json"):
                        assert response.json()["error"]["code"] in ("not_found", "bad_request")
                    else:
                        assert "does not work" in response.text
