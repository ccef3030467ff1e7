"""`GET /internal/users/{id}`: a user's current state for other services (campaign asks it when
`user.changed` has not reached it yet). Called on the auth service itself: the gateway does not
route `/internal/...`."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from herald.devinfra.stack import Stack
from herald.events.auth import UserChanged
from herald.events.requests import SendRequested

from .test_auth_accounts import confirmed_user

Requests = Callable[..., Awaitable[list[SendRequested]]]


@pytest.fixture
async def auth(platform: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=platform.url("auth"), timeout=30) as client:
        yield client


@pytest.fixture
def internal(platform: Stack) -> dict[str, str]:
    return {"X-Internal-Token": platform.secrets["INTERNAL_TOKEN"]}


async def test_answers_what_user_changed_carries(
    auth: httpx.AsyncClient,
    gateway: httpx.AsyncClient,
    sent_requests: Requests,
    internal: dict[str, str],
):
    user_id, email = await confirmed_user(gateway, sent_requests)
    response = await auth.get(f"/internal/users/{user_id}", headers=internal)
    assert response.status_code == 200, response.text
    user = UserChanged.model_validate_json(response.content)
    assert (user.user_id, user.email, user.email_verified) == (uuid.UUID(user_id), email, True)
    assert (user.status, user.role, user.timezone) == ("active", "user", "UTC")
    assert set(response.json()) == set(UserChanged.model_fields)


@pytest.mark.parametrize("headers", [{}, {"X-Internal-Token": "not-the-token"}])
async def test_refused_without_the_internal_token(
    auth: httpx.AsyncClient,
    gateway: httpx.AsyncClient,
    sent_requests: Requests,
    headers: dict[str, str],
):
    user_id, _ = await confirmed_user(gateway, sent_requests)
    response = await auth.get(f"/internal/users/{user_id}", headers=headers)
    assert response.status_code == 403, response.text
    assert "email" not in response.text
    # Not even a bad id gets past the token.
    assert (await auth.get("/internal/users/nope", headers=headers)).status_code == 403


async def test_unknown_user_is_404(auth: httpx.AsyncClient, internal: dict[str, str]):
    response = await auth.get(f"/internal/users/{uuid.uuid4()}", headers=internal)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


async def test_bad_id_is_422_naming_it(auth: httpx.AsyncClient, internal: dict[str, str]):
    response = await auth.get("/internal/users/not-a-uuid", headers=internal)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "user_id"


async def test_the_gateway_does_not_route_it(gateway: httpx.AsyncClient, internal: dict[str, str]):
    response = await gateway.get(f"/internal/users/{uuid.uuid4()}", headers=internal)
    assert response.status_code == 404
