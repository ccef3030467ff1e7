"""Fixtures of the hostile-input tests: real accounts that own one of everything, and the API
document the attacks are enumerated from."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from herald.devinfra.stack import Stack
from tests.gateway.conftest import PASSWORD, Requests, new_account
from tests.hostile.openapi_walk import Document


def client_address() -> str:
    """A client address of its own, so failed logins and rate limits stay out of other tests."""
    return f"10.{random.randrange(80, 250)}.{random.randrange(250)}.{random.randrange(1, 250)}"


@dataclass
class Owner:
    """A confirmed user and the ids of what it owns: one of each kind of object."""

    gateway: httpx.AsyncClient
    user_id: str
    email: str
    headers: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.headers | kwargs.pop("headers", {})
        return await self.gateway.request(method, path, headers=headers, **kwargs)

    async def made(self, method: str, path: str, status: int, **kwargs: Any) -> dict[str, Any]:
        response = await self.call(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        answer: dict[str, Any] = response.json()
        return answer


async def sender_known(owner: Owner) -> None:
    """Wait until the campaign service has the account's verified address (from auth's
    `user.changed`, which follows the confirmation by a moment)."""
    deadline = time.monotonic() + 60
    while True:
        response = await owner.call(
            "POST", "/compose", json={"subject": "probe", "text": "t", "from_email": owner.email}
        )
        if response.status_code == 201:
            await owner.call("DELETE", f"/emails/{response.json()['id']}")
            return
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.2)


async def furnished(gateway: httpx.AsyncClient, sent_requests: Requests, marker: str) -> Owner:
    """A new account with a list, a contact on it, a draft, a sent email, an import, an API key.

    `marker` is put into every name, so an answer that leaks this account's data shows it.
    """
    account = await new_account(gateway, sent_requests)
    owner = Owner(
        gateway,
        account.user_id,
        account.email,
        account.headers | {"X-Forwarded-For": client_address()},
    )
    the_list = await owner.made("POST", "/lists", 201, json={"name": f"{marker} list"})
    contact = await owner.made(
        "POST",
        "/contacts",
        201,
        json={
            "email": f"{marker}-{uuid.uuid4().hex[:8]}@example.com",
            "first_name": marker,
            "list_ids": [the_list["id"]],
        },
    )
    await sender_known(owner)
    draft = await owner.made(
        "POST",
        "/compose",
        201,
        json={"subject": f"{marker} draft", "text": "t", "list_ids": [the_list["id"]]},
    )
    sent = await owner.made(
        "POST",
        "/send",
        202,
        json={"to": [f"{marker}-sent@example.com"], "subject": f"{marker} sent", "text": "t"},
    )
    job = await owner.made(
        "POST",
        "/contacts/import",
        202,
        files={"file": ("c.csv", f"email\n{marker}-imp@example.com\n".encode(), "text/csv")},
    )
    key = await owner.made("POST", "/api-keys", 201, json={"name": f"{marker} key"})
    sessions = (await owner.call("GET", "/sessions")).json()
    owner.ids = {
        "list_id": the_list["id"],
        "contact_id": contact["id"],
        "email_id": draft["id"],
        "sent_email_id": sent["id"],
        "job_id": job["job_id"],
        "key_id": key["id"],
        "session_id": sessions[0]["id"],
        "user_id": owner.user_id,
    }
    # Tracking learns of an email from the pipeline: wait until it knows the sent one.
    deadline = time.monotonic() + 60
    while (await owner.call("GET", f"/tracking/{sent['id']}")).status_code != 200:
        assert time.monotonic() < deadline, "tracking never heard of the sent email"
        await asyncio.sleep(0.3)
    return owner


@pytest.fixture
async def owner(gateway: httpx.AsyncClient, sent_requests: Requests) -> Owner:
    return await furnished(gateway, sent_requests, f"own{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def stranger(gateway: httpx.AsyncClient, sent_requests: Requests) -> Owner:
    return await furnished(gateway, sent_requests, f"str{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def admin_headers(platform: Stack, gateway: httpx.AsyncClient) -> dict[str, str]:
    """An administrator's bearer header (the bootstrap administrator of the test platform)."""
    response = await gateway.post(
        "/login",
        json={"email": "admin@herald.example", "password": platform.secrets["ADMIN_PASSWORD"]},
        headers={"X-Forwarded-For": client_address()},
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
async def api(gateway: httpx.AsyncClient) -> Document:
    response = await gateway.get("/openapi.json")
    assert response.status_code == 200
    return Document(response.json())


__all__ = ["PASSWORD", "Owner", "client_address", "furnished"]
