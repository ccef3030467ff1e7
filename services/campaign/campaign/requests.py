"""The consumer of `email.requests`: send requests from other systems, checked before queueing.

Requests arrive as Herald envelopes (type `email.requested`) or as bare JSON objects with the
fields of `SendRequested` (other systems publish plain JSON). Each is parsed strictly (an unknown
key is refused, not ignored), its API key verified with auth, and its effect tried in a
transaction that is rolled back; whatever is wrong with a request sends it to
`email.requests.dlq` with the reason. Accepted requests then go through the shared runner's
inbox-deduplicated transaction like any event, so a repeat is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from campaign import domain, emails
from campaign.clients import AuthClient, Unavailable
from campaign.config import Settings
from campaign.metrics import REQUESTS
from herald import db
from herald.consumer import ConsumerRunner, Handler
from herald.errors import ApiError
from herald.events import Envelope, PoisonMessage, decode
from herald.events.requests import SendRequested
from herald.metrics import EVENT_HANDLING

log = logging.getLogger(__name__)

T = TypeVar("T")
_FIELDS = frozenset(SendRequested.model_fields)
_NAMESPACE = uuid.UUID("5b0c3c9e-4d0e-4a8e-9a55-1f1b3f1e6a01")


def _reason(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors()[:5]
    )


def _check_keys(document: dict[str, Any]) -> None:
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise PoisonMessage(f"unknown key(s): {', '.join(unknown)}")


def parse_request(raw: bytes | None) -> tuple[Envelope[SendRequested], bool]:
    """A send request from the wire, and whether it came bare (no envelope); or PoisonMessage
    saying what is wrong with it."""
    if raw is None:
        raise PoisonMessage("empty message (tombstone)")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PoisonMessage("not a JSON object")
    if "type" in document and "data" in document:
        if document["type"] != SendRequested.TYPE:
            raise PoisonMessage(f"unexpected event type {document['type']!r} on email.requests")
        if isinstance(document["data"], dict):
            _check_keys(document["data"])
        envelope = decode(raw)
        assert isinstance(envelope.data, SendRequested)
        data = envelope.data
        bare = False
    else:
        _check_keys(document)
        try:
            data = SendRequested.model_validate(document)
        except ValidationError as exc:
            raise PoisonMessage(f"bad request: {_reason(exc)}") from None
        if not data.api_key:
            raise PoisonMessage("api_key: required (a bare request names its account by API key)")
        envelope = Envelope.wrap(data, account_id=None)
        bare = True
    try:
        domain.addresses(data.to, "to", strict=not data.system)
        domain.prepare_content(data.subject, data.html, data.text)
        for name in ("from_email", "reply_to"):
            value = getattr(data, name)
            if value is not None:
                domain.address(value, name, strict=not data.system)
    except ApiError as exc:
        raise PoisonMessage(exc.message) from None
    return envelope, bare


class _StoppedWaiting(Exception):
    """The consumer stopped while auth could not be reached."""


class RequestsConsumer(ConsumerRunner):
    """The shared runner, with its decoding step replaced by `parse_request` and the checks."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        auth: AuthClient,
        handler: Handler,
    ) -> None:
        super().__init__(
            settings=settings,
            pool=pool,
            producer=producer,
            handlers={SendRequested: [handler]},
            group_id=f"{settings.service_name}-requests",
        )
        self._campaign_settings = settings
        self._auth = auth

    async def _process(self, tp: TopicPartition, records: Sequence[ConsumerRecord]) -> bool:
        started = time.perf_counter()
        events: list[tuple[ConsumerRecord, Envelope[Any]]] = []
        for record in records:
            try:
                envelope = await self.accept(record.value)
            except PoisonMessage as poison:
                REQUESTS.labels("rejected").inc()
                await self._dead_letter(record, poison.reason)
                continue
            if envelope is None:
                return False  # stopping while auth was unreachable: leave the offsets
            events.append((record, envelope))
        done = await self._handle_batch(tp.topic, events)
        EVENT_HANDLING.labels(tp.topic).observe(time.perf_counter() - started)
        return done

    async def accept(self, raw: bytes | None) -> Envelope[SendRequested] | None:
        """The request ready for its handler (account resolved, API key dropped), None if
        stopped while waiting for auth, or PoisonMessage."""
        try:
            return await self._accept(raw)
        except _StoppedWaiting:
            return None

    async def _accept(self, raw: bytes | None) -> Envelope[SendRequested]:
        envelope, bare = parse_request(raw)
        data = envelope.data
        account_id = envelope.account_id
        if data.api_key:
            if data.system:
                raise PoisonMessage("system: only Herald's own services send system mail")
            api_key = data.api_key
            owner = await self._from_auth(lambda: self._auth.verify_api_key(api_key))
            if owner is None:
                raise PoisonMessage("api_key: unknown or revoked API key")
            if account_id is not None and account_id != owner.account_id:
                raise PoisonMessage("account_id does not match the api_key's account")
            account_id = owner.account_id
        elif account_id is None:
            raise PoisonMessage("api_key: required (or an envelope with account_id)")
        event_id = (
            # A bare request has no id of its own: its idempotency key makes one.
            uuid.uuid5(_NAMESPACE, f"{account_id}:{data.idempotency_key}") if bare else envelope.id
        )
        ready = Envelope.wrap(
            data.model_copy(update={"api_key": None}),
            account_id=account_id,
            correlation_id=envelope.correlation_id,
            event_id=event_id,
        )
        if not data.system:
            # Campaign's copy of the sender, brought up to date from auth when it may be behind
            # (a user who confirmed their address and published at once).
            resolved = account_id
            await self._from_auth(
                lambda: emails.fresh_sender(
                    self._pool, self._auth, settings=self._campaign_settings, account_id=resolved
                )
            )
        await self._dry_run(ready)
        return ready

    async def _from_auth(self, ask: Callable[[], Awaitable[T]]) -> T:
        """`ask`'s answer, asked again with back-off while auth cannot be reached (or
        _StoppedWaiting if the consumer stops meanwhile)."""
        delay = 0.5
        while True:
            try:
                return await ask()
            except (Unavailable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status != 503:
                    raise
                if self._stopping.is_set():
                    raise _StoppedWaiting from None
                log.warning("auth unreachable, request waits", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _dry_run(self, envelope: Envelope[SendRequested]) -> None:
        """Try the request's effect and roll it back: refusals (sender, quota) surface here."""
        assert envelope.account_id is not None
        try:
            async with self._pool.acquire() as conn:
                transaction = conn.transaction()
                await transaction.start()
                try:
                    await emails.accept_request(
                        conn,
                        settings=self._campaign_settings,
                        account_id=envelope.account_id,
                        request=envelope.data,
                    )
                finally:
                    await transaction.rollback()
        except ApiError as exc:
            raise PoisonMessage(f"{exc.code}: {exc.message}") from None
        except Exception as exc:
            # Not the request's fault (database away): the handler's own retries deal with it.
            level = logging.INFO if db.is_connection_error(exc) else logging.WARNING
            log.log(level, "request check skipped", extra={"error": repr(exc)})
