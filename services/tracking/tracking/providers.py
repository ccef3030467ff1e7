"""Provider notifications (Amazon SES through SNS, SendGrid's Event Webhook) as our own events.

Pure parsing: what a payload says, in one shape, whatever the provider. A notification names the
message by our Message-ID (SES: `mail.headers` or `mail.commonHeaders.messageId`; SendGrid: the
`herald_message_id` custom argument or `smtp-id`), which is how it finds its recipient.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from tracking.domain import normalize_address, normalize_message_id

Provider = Literal["ses", "sendgrid"]
Kind = Literal["delivered", "deferred", "bounce", "dropped", "complaint", "open", "click", "other"]

# Headers that carry our id, in the order they are trusted (a provider may rewrite Message-ID).
_ID_HEADERS = ("x-herald-message-id", "message-id")


@dataclass(frozen=True)
class ProviderEvent:
    """One thing a provider says happened to one recipient of one message."""

    provider: Provider
    event_id: str
    kind: Kind
    at: datetime
    message_id: str | None
    provider_message_id: str | None = None
    recipient: str | None = None
    raw_type: str = ""
    hard: bool = False
    detail: str | None = None
    user_agent: str | None = None
    ip: str | None = None
    url: str | None = None
    machine: bool = False

    def extra(self) -> dict[str, Any]:
        """What is stored beside the event's columns, to replay it later."""
        return {
            "raw_type": self.raw_type,
            "hard": self.hard,
            "detail": self.detail,
            "user_agent": self.user_agent,
            "ip": self.ip,
            "url": self.url,
            "machine": self.machine,
        }


def link_key(url: str) -> int:
    """The per-link key of a link Herald did not rewrite (a provider's click): negative, from
    the URL, so it never collides with the position of a link Herald rewrote."""
    return -(zlib.crc32(url.encode()) % 2_000_000_000) - 1


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _str(value: object, limit: int = 2000) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()[:limit]
    return None


def _when(value: object, default: datetime) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return default
    text = _str(value, 64)
    if text is None:
        return default
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return default
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def ses_message_id(mail: Mapping[str, Any]) -> str | None:
    """Our Message-ID in an SES `mail` object."""
    found: dict[str, str] = {}
    for header in _list(mail.get("headers")):
        header = _dict(header)
        name, value = _str(header.get("name"), 100), _str(header.get("value"))
        if name and value and name.lower() in _ID_HEADERS:
            found.setdefault(name.lower(), value)
    for name in _ID_HEADERS:
        if name in found:
            return normalize_message_id(found[name])
    common = _str(_dict(mail.get("commonHeaders")).get("messageId"))
    return normalize_message_id(common) if common else None


def ses_events(
    notification_id: str, message: Mapping[str, Any], *, received_at: datetime
) -> list[ProviderEvent]:
    """The events in one SES notification (the JSON inside an SNS Notification's `Message`).

    Both SES notification feeds (`notificationType`) and event publishing (`eventType`) are read.
    """
    raw_type = _str(message.get("notificationType") or message.get("eventType"), 64) or ""
    mail = _dict(message.get("mail"))
    message_id = ses_message_id(mail)
    provider_id = _str(mail.get("messageId"), 200)
    mail_at = _when(mail.get("timestamp"), received_at)
    destination = [d for d in (_str(x, 320) for x in _list(mail.get("destination"))) if d]

    def made(
        kind: Kind, index: int, recipient: str | None, at: datetime, **more: Any
    ) -> ProviderEvent:
        return ProviderEvent(
            provider="ses",
            event_id=f"{notification_id}:{index}",
            kind=kind,
            at=at,
            message_id=message_id,
            provider_message_id=provider_id,
            recipient=normalize_address(recipient) if recipient else None,
            raw_type=raw_type,
            **more,
        )

    def recipients(items: object, key: str | None = "emailAddress") -> list[str | None]:
        named = [_str(_dict(i).get(key) if key else i, 320) for i in _list(items)]
        return [r for r in named if r] or list(destination) or [None]

    kind = raw_type.lower()
    if kind == "bounce":
        bounce = _dict(message.get("bounce"))
        hard = bounce.get("bounceType") == "Permanent"
        at = _when(bounce.get("timestamp"), mail_at)
        events = []
        for i, item in enumerate(_list(bounce.get("bouncedRecipients")) or [{}]):
            item = _dict(item)
            detail = _str(item.get("diagnosticCode")) or _str(bounce.get("bounceSubType"))
            address = _str(item.get("emailAddress"), 320) or (
                destination[0] if destination else None
            )
            events.append(made("bounce", i, address, at, hard=hard, detail=detail))
        return events
    if kind == "complaint":
        complaint = _dict(message.get("complaint"))
        at = _when(complaint.get("timestamp"), mail_at)
        detail = _str(complaint.get("complaintFeedbackType"), 200)
        return [
            made("complaint", i, address, at, detail=detail)
            for i, address in enumerate(recipients(complaint.get("complainedRecipients")))
        ]
    if kind == "delivery":
        delivery = _dict(message.get("delivery"))
        at = _when(delivery.get("timestamp"), mail_at)
        detail = _str(delivery.get("smtpResponse"), 500)
        return [
            made("delivered", i, address, at, detail=detail)
            for i, address in enumerate(recipients(delivery.get("recipients"), None))
        ]
    if kind == "deliverydelay":
        delay = _dict(message.get("deliveryDelay"))
        at = _when(delay.get("timestamp"), mail_at)
        detail = _str(delay.get("delayType"), 200)
        return [
            made("deferred", i, address, at, detail=detail)
            for i, address in enumerate(recipients(delay.get("delayedRecipients")))
        ]
    if kind == "reject":
        detail = _str(_dict(message.get("reject")).get("reason"), 500)
        return [
            made("dropped", i, address, mail_at, detail=detail)
            for i, address in enumerate(recipients(destination, None))
        ]
    if kind in ("open", "click"):
        action = _dict(message.get(kind))
        return [
            made(
                "open" if kind == "open" else "click",
                0,
                destination[0] if destination else None,
                _when(action.get("timestamp"), mail_at),
                user_agent=_str(action.get("userAgent"), 1000),
                ip=_str(action.get("ipAddress"), 64),
                url=_str(action.get("link"), 4000),
            )
        ]
    return [made("other", 0, destination[0] if destination else None, mail_at)]


_SENDGRID_KINDS: dict[str, Kind] = {
    "delivered": "delivered",
    "deferred": "deferred",
    "bounce": "bounce",
    "blocked": "bounce",
    "dropped": "dropped",
    "spamreport": "complaint",
    "open": "open",
    "click": "click",
}

# Drop reasons that say the address itself is bad (SendGrid suppresses it for that).
_BAD_ADDRESS_DROPS = ("bounced address", "invalid")


def sendgrid_event(item: object, *, received_at: datetime) -> ProviderEvent | None:
    """One entry of an Event Webhook post, or None when it is not an object."""
    if not isinstance(item, Mapping):
        return None
    raw_type = _str(item.get("event"), 64) or ""
    kind = _SENDGRID_KINDS.get(raw_type, "other")
    event_id = (
        _str(item.get("sg_event_id"), 200)
        or hashlib.sha256(orjson.dumps(item, option=orjson.OPT_SORT_KEYS)).hexdigest()
    )
    ours = _str(item.get("herald_message_id")) or _str(item.get("smtp-id"))
    provider_id = _str(item.get("sg_message_id"), 200)
    reason = _str(item.get("reason"), 1000) or _str(item.get("response"), 1000)
    hard = False
    if kind == "bounce":
        # A "blocked" bounce is the receiving server refusing for now (reputation, content).
        hard = raw_type == "bounce" and item.get("type") != "blocked"
    elif kind == "dropped":
        hard = reason is not None and any(bad in reason.lower() for bad in _BAD_ADDRESS_DROPS)
    email = _str(item.get("email"), 320)
    return ProviderEvent(
        provider="sendgrid",
        event_id=event_id,
        kind=kind,
        at=_when(item.get("timestamp"), received_at),
        message_id=normalize_message_id(ours) if ours else None,
        # SendGrid's own id is "<smtp-id part>.<filter part>"; the first part names the message.
        provider_message_id=provider_id.split(".", 1)[0] if provider_id else None,
        recipient=normalize_address(email) if email else None,
        raw_type=raw_type,
        hard=hard,
        detail=reason,
        user_agent=_str(item.get("useragent"), 1000),
        ip=_str(item.get("ip"), 64),
        url=_str(item.get("url"), 4000),
        machine=item.get("sg_machine_open") is True,
    )
