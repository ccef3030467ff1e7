"""Ended sessions and disabled users lose access everywhere within seconds, not at token expiry.

Access tokens live 10 minutes and every service verifies them itself, so each of these checks
asks both the gateway and another service (contacts) directly: a revocation that only auth or
only the gateway knew about would pass one and fail the other.
"""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from campaign.config import Settings as CampaignSettings
from herald.devinfra.stack import Stack
from herald.events.requests import SendRequested
from tests.auth.test_auth_accounts import PASSWORD, bearer, confirmed_user, login

Requests = Callable[..., Awaitable[list[SendRequested]]]
# How long a revocation may take to reach every verifier (the brief: "within a second").
PROPAGATION = 3.0
# How long campaign reuses auth's answer for an API key on a Kafka send request (the dev stack
# keeps the default).
_KAFKA_KEY_CACHE: float = CampaignSettings.model_fields["api_key_cache_seconds"].default


async def _status(client: httpx.AsyncClient, url: str, tokens: dict[str, Any]) -> int:
    return (await client.get(url, headers=bearer(tokens))).status_code


async def _accepted_everywhere(platform: Stack, tokens: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for url in _urls(platform):
            assert await _status(client, url, tokens) == 200, url


async def _refused_everywhere(
    platform: Stack, tokens: dict[str, Any], within: float = PROPAGATION
) -> None:
    """Every URL answers 401 to `tokens` within `within` seconds (and keeps doing so)."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=10) as client:
        for url in _urls(platform):
            while (status := await _status(client, url, tokens)) != 401:
                assert status == 200, (url, status)
                assert time.monotonic() < deadline, f"revoked token still accepted at {url}"
                await asyncio.sleep(0.1)
        for url in _urls(platform):
            assert await _status(client, url, tokens) == 401, url


def _urls(platform: Stack) -> list[str]:
    gateway = platform.url("gateway")
    return [
        f"{gateway}/profile",
        f"{gateway}/contacts",
        f"{platform.url('contacts')}/contacts",
        f"{platform.url('auth')}/profile",
    ]


async def test_logout_voids_the_access_token_everywhere(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, email = await confirmed_user(gateway, sent_requests)
    tokens, other = await login(gateway, email), await login(gateway, email)
    await _accepted_everywhere(platform, tokens)
    assert (await gateway.post("/logout", headers=bearer(tokens))).status_code == 204
    await _refused_everywhere(platform, tokens)
    # Only that session ended.
    await _accepted_everywhere(platform, other)


async def test_a_deleted_session_loses_its_access_token_everywhere(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, email = await confirmed_user(gateway, sent_requests)
    laptop, phone = await login(gateway, email), await login(gateway, email)
    await _accepted_everywhere(platform, phone)
    listed = (await gateway.get("/sessions", headers=bearer(laptop))).json()
    phone_id = next(s["id"] for s in listed if not s["current"])
    assert (
        await gateway.delete(f"/sessions/{phone_id}", headers=bearer(laptop))
    ).status_code == 204
    await _refused_everywhere(platform, phone)
    await _accepted_everywhere(platform, laptop)


async def test_a_reused_refresh_token_voids_every_access_token_of_its_session(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, email = await confirmed_user(gateway, sent_requests)
    first = await login(gateway, email)
    bystander = await login(gateway, email)
    second = (
        await gateway.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    ).json()
    await _accepted_everywhere(platform, first)
    await _accepted_everywhere(platform, second)
    reused = await gateway.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.json()["error"]["code"] == "refresh_token_reused"
    # The thief may hold either access token of the session: both die.
    await _refused_everywhere(platform, first)
    await _refused_everywhere(platform, second)
    await _accepted_everywhere(platform, bystander)


async def test_a_password_change_voids_the_other_sessions_access_tokens(
    gateway: httpx.AsyncClient, sent_requests: Requests, platform: Stack
):
    _, email = await confirmed_user(gateway, sent_requests)
    here, elsewhere = await login(gateway, email), await login(gateway, email)
    await _accepted_everywhere(platform, elsewhere)
    changed = await gateway.post(
        "/profile/password",
        json={"current_password": PASSWORD, "new_password": "revoking-" + PASSWORD},
        headers=bearer(here),
    )
    assert changed.status_code == 204
    await _refused_everywhere(platform, elsewhere)
    await _accepted_everywhere(platform, here)


async def test_a_disabled_users_token_key_and_kafka_requests_are_refused(
    gateway: httpx.AsyncClient,
    sent_requests: Requests,
    platform: Stack,
    sink: httpx.AsyncClient,
):
    user_id, email = await confirmed_user(gateway, sent_requests)
    tokens = await login(gateway, email)
    key = (
        await gateway.post(
            "/api-keys", json={"name": "server", "scope": "full"}, headers=bearer(tokens)
        )
    ).json()["key"]
    as_key = {"Authorization": f"Bearer {key}"}
    assert (await gateway.get("/contacts", headers=as_key)).status_code == 200
    await _accepted_everywhere(platform, tokens)

    # Before: a send request naming the account by this key is delivered.
    tag = uuid.uuid4().hex[:10]
    before = f"before-{tag}@example.com"
    await _publish_request(platform, api_key=key, to=before, key=f"before-{tag}")
    await _until(lambda: _delivered(sink, before), timeout=60)

    admin = await login(gateway, "admin@herald.example", platform.secrets["ADMIN_PASSWORD"])
    disabled = await gateway.patch(
        f"/admin/users/{user_id}", json={"disabled": True}, headers=bearer(admin)
    )
    assert disabled.status_code == 200
    disabled_at = time.monotonic()

    await _refused_everywhere(platform, tokens)
    # The gateway caches what a key was exchanged for for a few seconds, no longer.
    deadline = time.monotonic() + 10
    while (await gateway.get("/contacts", headers=as_key)).status_code != 401:
        assert time.monotonic() < deadline, "a disabled user's API key still works"
        await asyncio.sleep(0.2)

    # Campaign trusts auth's word on a key for a few seconds too; after that auth refuses it,
    # whether or not campaign has yet heard of the user's new state.
    await asyncio.sleep(max(0.0, _KAFKA_KEY_CACHE + 0.5 - (time.monotonic() - disabled_at)))
    after = f"after-{tag}@example.com"
    await _publish_request(platform, api_key=key, to=after, key=f"after-{tag}")
    [(_, headers)] = await _dead_letters(platform, marker=f"after-{tag}")
    reason = headers["dlq.reason"].decode()
    assert "disabled" in reason or "revoked" in reason, reason
    await asyncio.sleep(2)
    assert not await _delivered(sink, after)


async def _publish_request(platform: Stack, *, api_key: str, to: str, key: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=platform.kafka_bootstrap_servers)
    await producer.start()
    try:
        request = {
            "idempotency_key": key,
            "api_key": api_key,
            "to": to,
            "subject": f"Request {key}",
            "text": "From another system.",
        }
        await producer.send_and_wait(SendRequested.TOPIC, orjson.dumps(request))
    finally:
        await producer.stop()


async def _delivered(sink: httpx.AsyncClient, address: str) -> bool:
    found = await sink.get("/api/messages", params={"to": address, "limit": 5})
    return bool(found.json()["items"])


async def _until(check: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.3)


async def _dead_letters(
    platform: Stack, *, marker: str, timeout: float = 60
) -> list[tuple[bytes, dict[str, bytes]]]:
    """The messages on `email.requests.dlq` that contain `marker` (waits for the first)."""
    topic = f"{SendRequested.TOPIC}.dlq"
    consumer = AIOKafkaConsumer(bootstrap_servers=platform.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    found: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        while not found:
            assert time.monotonic() < deadline, f"nothing dead-lettered for {marker}"
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    if record.value is not None and marker.encode() in record.value:
                        found.append((record.value, dict(record.headers or ())))
    finally:
        await consumer.stop()
    return found
