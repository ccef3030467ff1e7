"""Brute force locks what is attacked, one address or one client, and nothing else.

These call auth directly with their own `X-Forwarded-For` (auth takes the last hop as the
client): behind the gateway every test shares the gateway's peer address, and locking it would
lock every other test out.
"""

import uuid
from collections.abc import Awaitable, Callable

import httpx

from auth.domain import ADDRESS_FAILURES_BEFORE_LOCK, FAILURES_BEFORE_LOCK
from herald.devinfra.stack import Stack
from herald.events.requests import SendRequested

from .test_auth_accounts import PASSWORD, confirmed_user

Requests = Callable[..., Awaitable[list[SendRequested]]]


def _client_address() -> str:
    value = uuid.uuid4().int
    return f"10.{value % 250}.{value // 250 % 250}.{value // 62_500 % 250 + 1}"


async def _login(auth: httpx.AsyncClient, email: str, password: str, client: str) -> httpx.Response:
    return await auth.post(
        "/login", json={"email": email, "password": password}, headers={"X-Forwarded-For": client}
    )


async def test_brute_force_on_one_email_address_locks_only_that_address(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, victim = await confirmed_user(gateway, sent_requests)
    _, neighbour = await confirmed_user(gateway, sent_requests)
    attacker = _client_address()
    async with httpx.AsyncClient(base_url=platform.url("auth"), timeout=30) as auth:
        for _ in range(FAILURES_BEFORE_LOCK):
            assert (await _login(auth, victim, "wrong-" + PASSWORD, attacker)).status_code == 401
        # Locked for everyone, the owner at another address included, even with the password.
        for client in (attacker, _client_address()):
            locked = await _login(auth, victim, PASSWORD, client)
            assert locked.status_code == 429, locked.text
            assert int(locked.headers["retry-after"]) >= 1
        # Another address is not touched, not even from the attacking client.
        assert (await _login(auth, neighbour, PASSWORD, attacker)).status_code == 200


async def test_brute_force_from_one_client_address_locks_only_that_client(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, email = await confirmed_user(gateway, sent_requests)
    attacker, bystander = _client_address(), _client_address()
    async with httpx.AsyncClient(base_url=platform.url("auth"), timeout=30) as auth:
        # Spread over many addresses, so no single address reaches its own threshold.
        for _ in range(ADDRESS_FAILURES_BEFORE_LOCK):
            sprayed = f"spray-{uuid.uuid4().hex[:10]}@example.com"
            assert (await _login(auth, sprayed, PASSWORD, attacker)).status_code == 401
        locked = await _login(auth, email, PASSWORD, attacker)
        assert locked.status_code == 429, locked.text
        assert locked.json()["error"]["code"] == "too_many_attempts"
        assert int(locked.headers["retry-after"]) >= 1
        # The same account from another client is fine: the lock is the attacker's alone.
        assert (await _login(auth, email, PASSWORD, bystander)).status_code == 200
