"""Provider webhooks: verify the call, read the notifications, apply them in one transaction."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from cryptography.hazmat.primitives.asymmetric import ec

from herald import db
from tracking import flows
from tracking.metrics import WEBHOOK_EVENTS
from tracking.providers import ProviderEvent, sendgrid_event, ses_events
from tracking.signatures import SnsVerifier, WebhookRejected, sendgrid_signature_ok

log = logging.getLogger(__name__)

_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookRejected(400, "malformed", "the body is not JSON") from None


class Webhooks:
    """Receives SES (through SNS) and SendGrid notifications."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        sns: SnsVerifier,
        sendgrid_key: ec.EllipticCurvePublicKey | None,
        rules: flows.Rules,
        unsigned_sendgrid: bool = True,
    ) -> None:
        self._pool = pool
        self.sns = sns
        self._sendgrid_key = sendgrid_key
        # Unsigned events would let anyone suppress any contact with a forged bounce: only
        # development and tests take them.
        self._unsigned_sendgrid = unsigned_sendgrid
        self._rules = rules

    async def _record(self, provider: str, events: list[ProviderEvent]) -> Counter[str]:
        for attempt in range(3):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    outcomes = await flows.record_provider_events(conn, events, rules=self._rules)
                break
            except _RETRYABLE:
                # Crossed the flush worker on the same rows; the whole post is tried again.
                if attempt == 2:
                    raise WebhookRejected(503, "busy", "try again") from None
            except Exception as exc:
                if not db.is_connection_error(exc):
                    raise
                # The provider retries a 5xx later; nothing was recorded.
                raise WebhookRejected(503, "unavailable", "the database is unavailable") from None
        for outcome, count in outcomes.items():
            WEBHOOK_EVENTS.labels(provider, outcome).inc(count)
        return outcomes

    async def ses(self, body: bytes) -> dict[str, Any]:
        """Handle one SNS message: a subscription handshake or an SES notification."""
        message = _json(body)
        if not isinstance(message, Mapping):
            raise WebhookRejected(400, "malformed", "an SNS message is a JSON object")
        await self.sns.verify(message)
        kind = message["Type"]
        if kind == "SubscriptionConfirmation":
            await self.sns.confirm(message)
            log.info("SNS subscription confirmed", extra={"topic": message.get("TopicArn")})
            return {"status": "confirmed"}
        if kind == "UnsubscribeConfirmation":
            log.warning("SNS subscription ended", extra={"topic": message.get("TopicArn")})
            return {"status": "unsubscribed"}
        try:
            notification = orjson.loads(message["Message"])
        except orjson.JSONDecodeError:
            notification = None
        if not isinstance(notification, Mapping):
            # SNS test messages and the like: signed and harmless, nothing to record.
            return {"status": "ignored", "events": 0}
        events = ses_events(str(message["MessageId"]), notification, received_at=datetime.now(UTC))
        outcomes = await self._record("ses", events)
        return {"status": "ok", "events": len(events), **outcomes}

    async def sendgrid(
        self, body: bytes, *, signature: str | None, timestamp: str | None
    ) -> dict[str, Any]:
        """Handle one Event Webhook post (a JSON array of events)."""
        if self._sendgrid_key is None and not self._unsigned_sendgrid:
            raise WebhookRejected(
                403,
                "unsigned",
                "unsigned SendGrid events are refused in production: set SENDGRID_PUBLIC_KEY",
            )
        if self._sendgrid_key is not None and not sendgrid_signature_ok(
            self._sendgrid_key, signature=signature, timestamp=timestamp, body=body
        ):
            raise WebhookRejected(403, "signature", "the SendGrid signature does not match")
        items = _json(body)
        if not isinstance(items, list):
            raise WebhookRejected(400, "malformed", "the Event Webhook posts a JSON array")
        received = datetime.now(UTC)
        events = [e for e in (sendgrid_event(i, received_at=received) for i in items) if e]
        outcomes = await self._record("sendgrid", events)
        return {"status": "ok", "events": len(events), **outcomes}
