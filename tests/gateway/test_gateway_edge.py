"""The gateway's edge policies, on a gateway of their own: HTTPS, identity, limits, CORS, caching.

The edge gateway runs over the test platform (real auth, token verification, API keys) with a
stand-in service behind `/contacts` and `/reports` that says what it received, so that what the
gateway forwards can be seen. Each test talks from its own client address (`X-Forwarded-For`,
trusted from loopback), so the per-address buckets of one test do not drain another's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx

from tests.conftest import TokenMaker
from tests.gateway.conftest import (
    LARGE_BODY,
    PASSWORD,
    Account,
    EdgeGateway,
    Requests,
    new_account,
)


def address() -> dict[str, str]:
    """Headers that make this client a new client address."""
    return {"X-Forwarded-For": f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_https_listener_serves_the_same_api_with_hsts(edge_gateway: EdgeGateway):
    async with edge_gateway.client(secure=True) as client:
        response = await client.get("/openapi.json", headers=address())
        assert response.status_code == 200
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        assert response.json()["openapi"] == "3.1.0"
    async with edge_gateway.client() as client:
        plain = await client.get("/openapi.json", headers=address())
        assert plain.status_code == 200
        assert "strict-transport-security" not in plain.headers


async def test_every_answer_carries_security_headers(edge_gateway: EdgeGateway):
    async with edge_gateway.client(secure=True) as client:
        for path in ("/docs", "/openapi.json", "/no/such/thing", "/contacts"):
            response = await client.get(path, headers=address())
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["referrer-policy"] == "no-referrer", path
            assert response.headers["x-request-id"], path
        page = await client.get("/docs", headers=address())
        assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_protected_paths_need_a_valid_token_and_public_ones_do_not(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    async with edge_gateway.client() as client:
        missing = await client.get("/contacts", headers=address())
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        forged = await client.get("/contacts", headers=address() | bearer("not.a.jwt"))
        assert forged.status_code == 401
        assert forged.json()["error"]["code"] == "invalid_token"
        expired = mint_token(ttl_seconds=-60)
        late = await client.get("/contacts", headers=address() | bearer(expired))
        assert late.status_code == 401
        unknown_key = await client.get("/contacts", headers=address() | bearer("hk_" + "x" * 40))
        assert unknown_key.status_code == 401
        # Public: the stand-in answers without any token.
        public = await client.post(
            "/unsubscribe/some-token",
            content=b"List-Unsubscribe=One-Click",
            headers=address() | {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert public.status_code != 401


async def test_identity_and_request_id_are_forwarded_and_cannot_be_spoofed(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    user = uuid.uuid4()
    token = mint_token(user)
    spoofed = {"X-Account-Id": str(uuid.uuid4()), "X-User-Role": "admin", "X-Internal-Token": "x"}
    async with edge_gateway.client() as client:
        response = await client.get(
            "/contacts",
            params={"limit": "5"},
            headers=address() | bearer(token) | spoofed | {"X-Request-ID": "edge-trace-1"},
        )
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["path"] == "/contacts"
    assert seen["query"] == "limit=5"
    headers = seen["headers"]
    assert headers["x-account-id"] == str(user)
    assert headers["x-user-id"] == str(user)
    assert headers["x-user-role"] == "user"
    assert headers["x-token-scope"] == "full"
    assert headers["authorization"] == f"Bearer {token}"
    assert headers["x-request-id"] == "edge-trace-1"
    assert "x-internal-token" not in headers
    assert headers["x-forwarded-for"].startswith("10.")
    assert response.headers["x-request-id"] == "edge-trace-1"


async def test_the_client_address_is_believed_only_from_trusted_proxies(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    client_ip = f"198.51.100.{uuid.uuid4().int % 250}"

    async def forwarded_for(source: str, claimed: str) -> str:
        transport = httpx.AsyncHTTPTransport(local_address=source)
        async with edge_gateway.client(transport=transport) as client:
            response = await client.get(
                "/contacts", headers=bearer(mint_token()) | {"X-Forwarded-For": claimed}
            )
        assert response.status_code == 200, response.text
        seen: str = response.json()["headers"]["x-forwarded-for"]
        return seen

    # From loopback (trusted): through an inner proxy (10.250/16, trusted) the client is the
    # address that proxy appended; the client's own claim on the left is passed on, not believed.
    assert await forwarded_for("127.0.0.1", f"6.6.6.6, {client_ip}, 10.250.0.1") == (
        f"6.6.6.6, {client_ip}"
    )
    # From an address no setting trusts, a claim is anybody's: the peer is the client.
    assert await forwarded_for("127.0.0.2", f"{client_ip}, 10.250.0.1") == "127.0.0.2"

    # The rate limit counts the same address: new claims from an untrusted peer share its bucket.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.3")
    async with edge_gateway.client(transport=transport) as client:
        statuses = [
            (await client.get("/asyncapi.json", headers=address())).status_code for _ in range(7)
        ]
    assert statuses == [200] * 6 + [429]


async def test_the_gateway_itself_refuses_a_logged_out_token(
    edge_gateway: EdgeGateway, gateway: httpx.AsyncClient, sent_requests: Requests
):
    # The stand-in service behind /contacts checks no token: a 401 can only be the gateway's.
    account = await new_account(gateway, sent_requests)
    other = await gateway.post("/login", json={"email": account.email, "password": PASSWORD})
    assert other.status_code == 200, other.text
    other_session = bearer(other.json()["access_token"])
    async with edge_gateway.client() as client:
        for _ in range(2):  # verified once, then served from the cache of verified tokens
            assert (await client.get("/contacts", headers=address() | account.headers)).is_success
        logout = await gateway.post("/logout", headers=account.headers)
        assert logout.status_code == 204, logout.text
        # A 429 counts as accepted: the account's bucket (small here) is charged only once the
        # token was taken. Waiting as Retry-After says keeps the polling inside the limit.
        deadline = time.monotonic() + 8
        while (
            answer := await client.get("/contacts", headers=address() | account.headers)
        ).is_success or answer.status_code == 429:
            assert time.monotonic() < deadline, "the gateway still accepts a logged-out token"
            await asyncio.sleep(float(answer.headers.get("Retry-After", "0.1")))
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_token"
        # Only that session ended. The same account's bucket may be empty after the polling:
        # wait as Retry-After says, then the other session's token must still be taken.
        for _ in range(3):
            kept = await client.get("/contacts", headers=address() | other_session)
            if kept.status_code != 429:
                break
            await asyncio.sleep(float(kept.headers.get("Retry-After", "1")))
        assert kept.is_success, kept.text


async def test_an_api_key_is_exchanged_before_forwarding(
    edge_gateway: EdgeGateway, gateway: httpx.AsyncClient, sent_requests: Requests
):
    account: Account = await new_account(gateway, sent_requests)
    created = await gateway.post(
        "/api-keys", json={"name": "edge", "scope": "send"}, headers=account.headers
    )
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    async with edge_gateway.client() as client:
        response = await client.get("/contacts", headers=address() | bearer(key))
    assert response.status_code == 200, response.text
    headers = response.json()["headers"]
    assert headers["authorization"].startswith("Bearer ey")
    assert key not in headers["authorization"]
    assert headers["x-account-id"] == account.user_id
    assert headers["x-token-scope"] == "send"


async def test_paths_that_lead_nowhere_or_inside_are_404(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    token = mint_token(role="admin")
    async with edge_gateway.client() as client:
        for path in (
            "/internal/usage",
            "/contacts/internal/stats",
            "/contacts/%2e%2e/%2e%2e/internal/stats",
            "/nothing-here",
        ):
            response = await client.get(path, headers=address() | bearer(token))
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] == "not_found"


async def test_the_path_is_forwarded_as_the_client_encoded_it(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    async with edge_gateway.client() as client:
        response = await client.get("/contacts/a%2Fb%20c", headers=address() | bearer(mint_token()))
    assert response.json()["raw_path"] == "/contacts/a%2Fb%20c"


async def test_large_answers_stream_through_as_the_service_sent_them(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    async with edge_gateway.client() as client:
        for shape in ("length", "chunked", "gzip"):
            async with client.stream(
                "GET",
                "/contacts/large",
                params={"as": shape},
                headers=address() | bearer(mint_token()),
            ) as response:
                assert response.status_code == 200, shape
                # Passed on encoded: the client, not the gateway, decodes it.
                assert response.headers.get("content-encoding") == (
                    "gzip" if shape == "gzip" else None
                )
                assert b"".join([chunk async for chunk in response.aiter_bytes()]) == LARGE_BODY
                assert response.headers.get_list("set-cookie") == ["a=1", "b=2"], shape
                assert response.headers["x-content-type-options"] == "nosniff"


async def test_rate_limit_per_client_address(edge_gateway: EdgeGateway):
    client_address = address()
    async with edge_gateway.client() as client:
        answers = [await client.get("/asyncapi.json", headers=client_address) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        assert answers[0].headers["ratelimit-limit"] == "6"
        remaining = [int(a.headers["ratelimit-remaining"]) for a in answers]
        assert remaining == sorted(remaining, reverse=True)
        refused = await client.get("/asyncapi.json", headers=client_address)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["ratelimit-remaining"] == "0"
        assert int(refused.headers["ratelimit-reset"]) >= 1
        # Another address is not affected; health checks never are.
        assert (await client.get("/asyncapi.json", headers=address())).status_code == 200
        assert (await client.get("/healthz", headers=client_address)).status_code == 200


async def test_rate_limit_per_account_across_addresses(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    token = bearer(mint_token())
    async with edge_gateway.client() as client:
        statuses = [
            (await client.get("/contacts", headers=address() | token)).status_code for _ in range(5)
        ]
        assert statuses[:4] == [200] * 4
        assert statuses[4] == 429
        refused = await client.get("/contacts", headers=address() | token)
        assert refused.json()["error"]["message"] == "too many requests for this account"
        assert int(refused.headers["retry-after"]) >= 1
        other = await client.get("/contacts", headers=address() | bearer(mint_token()))
        assert other.status_code == 200


async def test_body_size_limits(edge_gateway: EdgeGateway, mint_token: TokenMaker):
    token = bearer(mint_token())
    async with edge_gateway.client() as client:
        small = await client.post(
            "/contacts", json={"email": "a@example.com"}, headers=address() | token
        )
        assert small.status_code == 200
        large = await client.post("/contacts", json={"note": "x" * 5000}, headers=address() | token)
        assert large.status_code == 413
        assert large.json()["error"]["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        streamed = await client.post(
            "/contacts",
            content=chunks(),
            headers=address() | token | {"Content-Type": "application/json"},
        )
        assert streamed.status_code == 413
        # Uploads have their own, larger limit.
        upload = await client.post(
            "/contacts/import",
            files={"file": ("c.csv", b"email\n" + b"a@example.com\n" * 1000, "text/csv")},
            headers=address() | token,
        )
        assert upload.status_code == 200, upload.text
        assert upload.json()["body_bytes"] > 4096


async def test_json_endpoints_take_json_only(edge_gateway: EdgeGateway, mint_token: TokenMaker):
    async with edge_gateway.client() as client:

        async def post(path: str, content_type: str, body: bytes = b"{}") -> httpx.Response:
            # A new account each time: this test is about media types, not the account's bucket.
            headers = address() | bearer(mint_token()) | {"Content-Type": content_type}
            return await client.post(path, content=body, headers=headers)

        refused = await post("/contacts", "text/plain")
        assert refused.status_code == 415
        assert refused.json()["error"]["details"][0]["field"] == "Content-Type"
        assert (await post("/contacts", "application/x-www-form-urlencoded")).status_code == 415
        assert (await post("/contacts", "application/json; charset=utf-8")).status_code == 200
        assert (await post("/contacts/x", "application/merge-patch+json")).status_code == 200
        assert (await post("/contacts/import", "application/json")).status_code == 415
        assert (
            await post("/contacts/import", "multipart/form-data; boundary=x")
        ).status_code == 200
        form = "application/x-www-form-urlencoded"
        assert (
            await post("/unsubscribe/t0k3n", form, b"List-Unsubscribe=One-Click")
        ).status_code == 200
        # No body, no type needed.
        empty = await client.post("/contacts/x/cancel", headers=address() | bearer(mint_token()))
        assert empty.status_code == 200


async def test_a_slow_service_gives_a_prompt_504(edge_gateway: EdgeGateway, mint_token: TokenMaker):
    async with edge_gateway.client() as client:
        started = time.monotonic()
        response = await client.get("/contacts/slow", headers=address() | bearer(mint_token()))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 4


async def test_cors_preflight_and_answers_for_configured_origins(edge_gateway: EdgeGateway):
    async with edge_gateway.client() as client:
        preflight = await client.options(
            "/contacts",
            headers=address()
            | {
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        refused = await client.options(
            "/contacts",
            headers=address()
            | {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "cors_refused"
        answer = await client.get(
            "/openapi.json", headers=address() | {"Origin": "https://app.example"}
        )
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "ratelimit-remaining" in answer.headers["access-control-expose-headers"].lower()


async def test_reports_are_cached_per_account_with_etags(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    first_account, second_account = bearer(mint_token()), bearer(mint_token())
    query = {"from": "2026-01-01", "tag": uuid.uuid4().hex}
    async with edge_gateway.client() as client:
        first = await client.get("/reports", params=query, headers=address() | first_account)
        assert first.status_code == 200
        etag = first.headers["etag"]
        assert first.headers["cache-control"].startswith("private, max-age=")
        again = await client.get("/reports", params=query, headers=address() | first_account)
        assert again.json() == first.json()
        assert again.headers["etag"] == etag
        not_modified = await client.get(
            "/reports", params=query, headers=address() | first_account | {"If-None-Match": etag}
        )
        assert not_modified.status_code == 304
        assert not_modified.content == b""
        other = await client.get("/reports", params=query, headers=address() | second_account)
        assert other.json()["served"] != first.json()["served"]
        fresh = await client.get(
            "/reports",
            params=query,
            headers=address() | first_account | {"Cache-Control": "no-cache"},
        )
        assert fresh.json()["served"] > first.json()["served"]
        assert fresh.headers["etag"] != etag

        # A send-only key of the same account is not served the full caller's cached answer.
        user_id = uuid.uuid4()
        full, send_only = (
            bearer(mint_token(user_id)),
            bearer(mint_token(user_id, scope="send")),
        )
        cached = await client.get("/reports", params=query, headers=address() | full)
        narrow = await client.get("/reports", params=query, headers=address() | send_only)
        assert narrow.json()["served"] != cached.json()["served"]


async def test_the_jwks_is_cached_for_everyone_with_an_etag(edge_gateway: EdgeGateway):
    async with edge_gateway.client() as client:
        first = await client.get("/.well-known/jwks.json", headers=address())
        assert first.status_code == 200
        assert first.json()["keys"]
        assert first.headers["cache-control"].startswith("public, max-age=")
        again = await client.get(
            "/.well-known/jwks.json", headers=address() | {"If-None-Match": first.headers["etag"]}
        )
        assert again.status_code == 304


async def test_the_gateway_keeps_serving_while_requests_pile_up(
    edge_gateway: EdgeGateway, mint_token: TokenMaker
):
    # A slow upstream call must not hold up others on the same gateway.
    async with edge_gateway.client() as client:
        slow = asyncio.create_task(
            client.get("/contacts/slow", headers=address() | bearer(mint_token()))
        )
        started = time.monotonic()
        quick = await client.get("/contacts/quick", headers=address() | bearer(mint_token()))
        assert quick.status_code == 200
        assert time.monotonic() - started < 1
        assert (await slow).status_code == 504
