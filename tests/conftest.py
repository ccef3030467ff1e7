"""Fixtures for the integration and end-to-end tests (infrastructure comes from herald.testing)."""

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest
from aiokafka import AIOKafkaConsumer

from auth.tokens import SigningKey, issue_access_token
from herald.devinfra.stack import Stack
from herald.events import PoisonMessage, decode
from herald.events.requests import SendRequested

TokenMaker = Callable[..., str]


@pytest.fixture
def mint_token(infra: Stack) -> TokenMaker:
    """Access tokens signed with the stack's key, as auth would issue them after a login.

    For tests of other services that need a caller but are not about logging in.
    """
    key = SigningKey.from_pem(infra.secrets["JWT_PRIVATE_KEY"])

    def mint(
        user_id: uuid.UUID | None = None,
        *,
        role: Literal["user", "admin"] = "user",
        scope: Literal["full", "send"] = "full",
        ttl_seconds: int = 600,
    ) -> str:
        return issue_access_token(
            key,
            user_id=user_id or uuid.uuid4(),
            role=role,
            scope=scope,
            issuer="herald",
            audience="herald-api",
            ttl_seconds=ttl_seconds,
        ).token

    return mint


@pytest.fixture
def sent_requests(infra: Stack) -> Callable[..., Awaitable[list[SendRequested]]]:
    """Reads `email.requests` from its beginning: the send requests published for `to`.

    Lets tests of a producer (auth's system mails) see what it asked to send without depending
    on the rest of the delivery pipeline.
    """

    async def read(to: str, *, at_least: int = 1, timeout: float = 20) -> list[SendRequested]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await _requests_for(infra, to)
            if len(found) >= at_least or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.2)

    return read


async def _requests_for(infra: Stack, to: str) -> list[SendRequested]:
    consumer = AIOKafkaConsumer(
        SendRequested.TOPIC,
        bootstrap_servers=infra.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        partitions = list(consumer.assignment())
        end = await consumer.end_offsets(partitions)
        found: list[SendRequested] = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    with contextlib.suppress(PoisonMessage):
                        data = decode(record.value).data
                        if isinstance(data, SendRequested) and to in data.to:
                            found.append(data)
        return found
    finally:
        await consumer.stop()
