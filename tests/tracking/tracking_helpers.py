"""What the tracking tests share: accounts, events as other services publish them, signed links."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from herald.devinfra.stack import Stack
from herald.events import Envelope, EventData, PoisonMessage, decode
from herald.events.campaign import Audience, EmailContent, EmailScheduled
from herald.events.dispatcher import MessageDispatched
from herald.links import ClickToken, LinkSigner, OpenToken
from tests.conftest import TokenMaker

T = TypeVar("T")


@dataclass
class Account:
    """A caller of the tracking API, with a valid access token."""

    id: uuid.UUID
    headers: dict[str, str]

    @classmethod
    def new(cls, mint_token: TokenMaker) -> Account:
        account_id = uuid.uuid4()
        return cls(account_id, {"Authorization": f"Bearer {mint_token(account_id)}"})


@dataclass
class Email:
    """An email of an account and its messages (one per recipient)."""

    account: Account
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    messages: dict[str, str] = field(default_factory=dict)
    # As the dispatcher does: events and tokens name a message by a bare UUID, and its
    # Message-ID header is `<uuid@domain>`.
    bare_ids: bool = False

    def message_id(self, recipient: str) -> str:
        if recipient not in self.messages:
            made = uuid.uuid4()
            self.messages[recipient] = str(made) if self.bare_ids else f"<{made.hex}@herald.test>"
        return self.messages[recipient]

    def header_id(self, recipient: str) -> str:
        """The Message-ID header of the recipient's message, as providers report it."""
        message_id = self.message_id(recipient)
        return f"<{message_id}@mail.herald.test>" if self.bare_ids else message_id


def wrap(
    data: EventData, account_id: uuid.UUID | None, at: datetime | None = None
) -> Envelope[Any]:
    """An envelope as another service's outbox would publish it, stamped `at` (default now)."""
    envelope = Envelope.wrap(data, account_id=account_id)
    return envelope.model_copy(update={"occurred_at": at}) if at is not None else envelope


def dispatched(
    email: Email,
    recipient: str,
    status: Literal["sent", "deferred", "failed"] = "sent",
    *,
    attempt: int = 1,
    ago: timedelta = timedelta(minutes=10),
    smtp_code: int | None = 250,
) -> Envelope[Any]:
    """The dispatcher's outcome for one recipient, `ago` in the past."""
    data = MessageDispatched(
        email_id=email.id,
        message_id=email.message_id(recipient),
        recipient=recipient,
        status=status,
        attempt=attempt,
        smtp_code=smtp_code,
        smtp_reply="2.0.0 Ok" if status == "sent" else "4.2.0 try later",
    )
    return wrap(data, email.account.id, datetime.now(UTC) - ago)


def scheduled(email: Email, subject: str, tags: list[str]) -> Envelope[Any]:
    """The campaign service's hand-over of the email (subject and tags). It is due a year from
    now and has no audience, so the scheduler keeps it and nothing is ever sent for it."""
    data = EmailScheduled(
        email_id=email.id,
        revision=1,
        send_at=datetime.now(UTC) + timedelta(days=365),
        kind="campaign",
        content=EmailContent(subject=subject, from_email="news@herald.test", tags=tags),
        audience=Audience(),
    )
    return wrap(data, email.account.id)


async def publish(stack: Stack, *envelopes: Envelope[Any]) -> None:
    """Publish events as their producers' outbox relays do (keyed, JSON)."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        for envelope in envelopes:
            key = envelope.data.partition_key()
            await producer.send_and_wait(
                envelope.topic,
                envelope.to_bytes(),
                key=key.encode() if key is not None else None,
            )
    finally:
        await producer.stop()


def signer(stack: Stack) -> LinkSigner:
    return LinkSigner.from_spec(stack.secrets["LINK_SIGNING_KEYS"])


def open_url(stack: Stack, email: Email, recipient: str) -> str:
    token = signer(stack).sign(
        "open", OpenToken(m=email.message_id(recipient), e=email.id, a=email.account.id)
    )
    return f"/t/o/{token}"


def click_url(stack: Stack, email: Email, recipient: str, index: int, url: str) -> str:
    token = signer(stack).sign(
        "click",
        ClickToken(m=email.message_id(recipient), e=email.id, a=email.account.id, i=index, u=url),
    )
    return f"/t/c/{token}"


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout: float = 30,
    interval: float = 0.1,
) -> T:
    """Poll `probe` until `until` holds for its answer; the last answer otherwise (assert it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if until(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def tracking(gateway: httpx.AsyncClient, email: Email, **params: Any) -> dict[str, Any]:
    response = await gateway.get(
        f"/tracking/{email.id}", headers=email.account.headers, params=params
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def counts_when(
    gateway: httpx.AsyncClient, email: Email, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The email's counts once `until` holds for them (or the last seen, to assert on)."""

    async def probe() -> dict[str, Any]:
        response = await gateway.get(f"/tracking/{email.id}", headers=email.account.headers)
        return response.json()["counts"] if response.status_code == 200 else {}

    return await eventually(probe, lambda c: bool(c) and until(c))


async def read_events(
    stack: Stack,
    topic: str,
    match: Callable[[Any], bool],
    *,
    at_least: int = 1,
    timeout: float = 20,
) -> list[Any]:
    """The events on `topic` (from its beginning) that `match`, once there are `at_least`."""

    async def probe() -> list[Any]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=stack.kafka_bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            while not consumer.assignment():
                await asyncio.sleep(0.05)
            partitions = list(consumer.assignment())
            end = await consumer.end_offsets(partitions)
            found: list[Any] = []
            while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        with contextlib.suppress(PoisonMessage):
                            envelope = decode(record.value)
                            if match(envelope):
                                found.append(envelope)
            return found
        finally:
            await consumer.stop()

    return await eventually(probe, lambda found: len(found) >= at_least, timeout=timeout)
