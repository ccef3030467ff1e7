"""`AuthClient.user`: what each answer of `GET /internal/users/{id}` becomes (no network)."""

import uuid

import httpx
import pytest

from campaign.clients import AuthClient, Unavailable
from herald.events.auth import UserChanged

USER = UserChanged(
    user_id=uuid.uuid4(), email="a@example.com", email_verified=True, status="active", role="user"
)


def client(answer: httpx.Response | Exception) -> AuthClient:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/internal/users/{USER.user_id}"
        assert request.headers["x-internal-token"] == "t"
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return AuthClient(
        http, base_url="http://auth/", headers={"X-Internal-Token": "t"}, cache_seconds=0
    )


async def test_the_users_state_is_the_event_model():
    assert (
        await client(httpx.Response(200, content=USER.model_dump_json())).user(USER.user_id) == USER
    )


async def test_an_unknown_user_is_none():
    assert await client(httpx.Response(404)).user(USER.user_id) is None


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503),
        httpx.Response(429),
        httpx.Response(403),
        httpx.Response(200, content=b"{}"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
)
async def test_anything_else_is_unavailable(answer: httpx.Response | Exception):
    with pytest.raises(Unavailable):
        await client(answer).user(USER.user_id)
