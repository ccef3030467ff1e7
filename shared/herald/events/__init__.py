"""Event contracts: the envelope, and one module per producing service.

Importing this package registers every event type, so `decode` knows them all.
"""

from herald.events import auth, campaign, contacts, dispatcher, requests, scheduler, tracking
from herald.events._envelope import (
    EVENT_TYPES,
    Envelope,
    EventData,
    PoisonMessage,
    decode,
    event,
)

__all__ = [
    "EVENT_TYPES",
    "Envelope",
    "EventData",
    "PoisonMessage",
    "auth",
    "campaign",
    "contacts",
    "decode",
    "dispatcher",
    "event",
    "requests",
    "scheduler",
    "topics",
    "tracking",
]


def topics() -> list[str]:
    """Every topic the platform uses, with the dead-letter topic of each."""
    names = sorted({cls.TOPIC for cls in EVENT_TYPES.values()})
    return names + [f"{name}.dlq" for name in names]
