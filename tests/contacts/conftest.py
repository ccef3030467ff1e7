"""Callers of the contacts API for the tests of this folder: each a new account of its own."""

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import TokenMaker


class Account:
    """A caller of the API with its own token (the account id is the user id)."""

    def __init__(self, gateway: httpx.AsyncClient, mint_token: TokenMaker) -> None:
        self.gateway = gateway
        self.id = uuid.uuid4()
        self.headers = {"Authorization": f"Bearer {mint_token(self.id)}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.gateway.request(method, path, headers=self.headers, **kwargs)

    async def contact(self, email: str | None = None, **fields: Any) -> dict[str, Any]:
        email = email or f"c-{uuid.uuid4().hex[:10]}@example.com"
        response = await self.call("POST", "/contacts", json={"email": email, **fields})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def new_list(self, name: str | None = None) -> dict[str, Any]:
        response = await self.call("POST", "/lists", json={"name": name or uuid.uuid4().hex})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def upload(
        self, content: bytes, *, filename: str = "contacts.csv", **fields: str
    ) -> httpx.Response:
        return await self.call(
            "POST",
            "/contacts/import",
            files={"file": (filename, content, "text/csv")},
            data=fields,
        )

    async def finished_import(self, content: bytes, **fields: str) -> dict[str, Any]:
        response = await self.upload(content, **fields)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        assert response.headers["location"] == f"/contacts/import/{job_id}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = await self.call("GET", f"/contacts/import/{job_id}")
            assert job.status_code == 200, job.text
            if job.json()["status"] in ("succeeded", "failed"):
                return dict(job.json())
            await asyncio.sleep(0.1)
        raise AssertionError("the import did not finish")

    async def all_contacts(self, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            response = await self.call("GET", "/contacts", params=query)
            assert response.status_code == 200, response.text
            items += response.json()["items"]
            cursor = response.json()["next_cursor"]
            if cursor is None:
                return items


@pytest.fixture
def account(gateway: httpx.AsyncClient, mint_token: TokenMaker) -> Account:
    return Account(gateway, mint_token)


@pytest.fixture
def other(gateway: httpx.AsyncClient, mint_token: TokenMaker) -> Account:
    return Account(gateway, mint_token)
