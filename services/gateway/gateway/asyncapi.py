"""An AsyncAPI 3.0 document of Herald's Kafka interface, generated from the event contracts.

Every event type registered in `herald.events` becomes a message on its topic's channel, wrapped
in the one envelope; `email.requests` is what other systems publish (Herald receives it, as an
envelope or as a bare send request), every other topic is what Herald publishes and other
systems may consume. Rejected send requests land on `email.requests.dlq` with the reason.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from pydantic.json_schema import models_json_schema

from herald.events import EVENT_TYPES, EventData
from herald.events.requests import SendRequested

_SCHEMAS = "#/components/schemas/"
_DLQ_HEADERS = ("reason", "topic", "partition", "offset", "group", "failed_at")

DESCRIPTION = """Herald's Kafka topics: what other systems may publish and consume.

Every event travels in one JSON envelope: `id` (UUID, the idempotency key: a consumer must treat
a second delivery of one id as a no-op), `type`, `version`, `occurred_at` (UTC), `account_id`,
`correlation_id` and `data`. Readers ignore fields they do not know, so fields are added without
a new version. Events of one email share a partition key (the email id, or the recipient for
bounces and complaints), so they arrive in order.

Other systems send email by publishing onto `email.requests`: either an envelope of type
`email.requested`, or the bare send request object, naming the account with `api_key`. A request
that cannot be accepted is copied unchanged onto `email.requests.dlq`, with Kafka headers saying
why; nothing is dropped silently."""


def _identifier(text: str) -> str:
    parts = re.split(r"[^A-Za-z0-9]+", text)
    return parts[0] + "".join(p.capitalize() for p in parts[1:])


def _summary(cls: type[EventData]) -> str:
    doc = (cls.__doc__ or "").strip()
    # Pydantic gives undocumented models BaseModel's docstring; that says nothing of the event.
    if not doc or doc.startswith("Usage docs") or cls.__doc__ == EventData.__doc__:
        return f"`{cls.TYPE}`, version {cls.VERSION}."
    return " ".join(doc.split("\n\n", 1)[0].split())


def _envelope(cls: type[EventData]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "type", "version", "occurred_at", "data"],
        "properties": {
            "id": {"type": "string", "format": "uuid", "description": "The idempotency key."},
            "type": {"type": "string", "const": cls.TYPE},
            "version": {"type": "integer", "minimum": 1, "maximum": cls.VERSION},
            "occurred_at": {"type": "string", "format": "date-time"},
            "account_id": {"type": ["string", "null"], "format": "uuid"},
            "correlation_id": {"type": ["string", "null"]},
            "data": {"$ref": _SCHEMAS + cls.__name__},
        },
    }


def document(*, version: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic and event type."""
    classes = sorted(EVENT_TYPES.values(), key=lambda c: (c.TOPIC, c.TYPE))
    _, top = models_json_schema(
        [(cls, "validation") for cls in classes], ref_template=_SCHEMAS + "{model}"
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    by_topic: dict[str, list[type[EventData]]] = defaultdict(list)
    for cls in classes:
        by_topic[cls.TOPIC].append(cls)

    for topic, members in by_topic.items():
        channel_id = _identifier(topic)
        channel_messages: dict[str, Any] = {}
        for cls in members:
            message_id = _identifier(cls.TYPE)
            messages[message_id] = {
                "name": cls.TYPE,
                "title": cls.TYPE,
                "summary": _summary(cls),
                "contentType": "application/json",
                "payload": _envelope(cls),
            }
            channel_messages[message_id] = {"$ref": f"#/components/messages/{message_id}"}
        inbound = SendRequested in members
        if inbound:
            messages["bareSendRequest"] = {
                "name": "send request",
                "title": "Bare send request",
                "summary": "The send request object alone, the account named by `api_key`.",
                "contentType": "application/json",
                "payload": {"$ref": _SCHEMAS + SendRequested.__name__},
            }
            channel_messages["bareSendRequest"] = {"$ref": "#/components/messages/bareSendRequest"}
        channels[channel_id] = {
            "address": topic,
            "title": topic,
            "description": "; ".join(_summary(c) for c in members),
            "messages": channel_messages,
        }
        operations[
            ("receive" if inbound else "publish") + channel_id[0].upper() + channel_id[1:]
        ] = {
            "action": "receive" if inbound else "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": (
                f"Herald accepts send requests on `{topic}`."
                if inbound
                else f"Herald publishes on `{topic}`; other systems may consume it."
            ),
            "messages": [
                {"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in channel_messages
            ],
        }

    messages["rejectedSendRequest"] = {
        "name": "rejected send request",
        "title": "Rejected send request",
        "summary": "A message from `email.requests` that could not be accepted, unchanged.",
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "properties": {f"dlq.{h}": {"type": "string"} for h in _DLQ_HEADERS},
        },
        "payload": {"description": "The rejected message's bytes, as published."},
    }
    dlq = _identifier(f"{SendRequested.TOPIC}.dlq")
    channels[dlq] = {
        "address": f"{SendRequested.TOPIC}.dlq",
        "title": f"{SendRequested.TOPIC}.dlq",
        "description": "Send requests that were refused, with `dlq.reason` saying why.",
        "messages": {"rejectedSendRequest": {"$ref": "#/components/messages/rejectedSendRequest"}},
    }
    operations["publishEmailRequestsDlq"] = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{dlq}"},
        "summary": "Herald copies every refused send request here.",
        "messages": [{"$ref": f"#/channels/{dlq}/messages/rejectedSendRequest"}],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Herald events", "version": version, "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
