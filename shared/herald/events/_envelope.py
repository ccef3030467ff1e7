"""The one envelope every event travels in, and the registry of event types."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar, cast

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError


class EventData(BaseModel):
    """The `data` of an event. Subclasses name their `TYPE` and the `TOPIC` they travel on."""

    # Readers ignore fields they do not know, so producers can add fields without a new version.
    model_config = ConfigDict(frozen=True, extra="ignore")

    TYPE: ClassVar[str]
    TOPIC: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def partition_key(self) -> str | None:
        """What keeps related events ordered in one partition; None spreads them."""
        return None


DataT = TypeVar("DataT", bound=EventData)


class Envelope(BaseModel, Generic[DataT]):
    """`id` is the idempotency key consumers deduplicate on; JSON on the wire."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    type: str
    version: int
    occurred_at: AwareDatetime
    account_id: uuid.UUID | None = None
    correlation_id: str | None = None
    data: DataT

    @classmethod
    def wrap(
        cls,
        data: DataT,
        *,
        account_id: uuid.UUID | None,
        correlation_id: str | None = None,
        event_id: uuid.UUID | None = None,
    ) -> Envelope[DataT]:
        """Put `data` in a new envelope, stamped now."""
        # Parametrised at run time so that pydantic serialises `data` as its own class.
        parametrised = cast("type[Envelope[DataT]]", Envelope[type(data)])  # type: ignore[misc]
        return parametrised(
            id=event_id or uuid.uuid4(),
            type=data.TYPE,
            version=data.VERSION,
            occurred_at=datetime.now(UTC),
            account_id=account_id,
            correlation_id=correlation_id,
            data=data,
        )

    @property
    def topic(self) -> str:
        return self.data.TOPIC

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class PoisonMessage(ValueError):
    """A message that can never be processed; it goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


EVENT_TYPES: dict[str, type[EventData]] = {}

E = TypeVar("E", bound=type[EventData])


def event(cls: E) -> E:
    """Register an event data class under its TYPE (class decorator)."""
    if cls.TYPE in EVENT_TYPES and EVENT_TYPES[cls.TYPE] is not cls:
        raise ValueError(f"event type {cls.TYPE!r} registered twice")
    EVENT_TYPES[cls.TYPE] = cls
    return cls


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: uuid.UUID
    type: str = Field(min_length=1)
    version: int


# Envelope[data_class] per class: pydantic's own lookup of a parametrised model costs more than
# the rest of decoding a small event.
_ENVELOPE_MODELS: dict[type[EventData], type[Envelope[Any]]] = {}


def _envelope_model(data_class: type[EventData]) -> type[Envelope[Any]]:
    model = _ENVELOPE_MODELS.get(data_class)
    if model is None:
        model = _ENVELOPE_MODELS[data_class] = Envelope[data_class]  # type: ignore[valid-type]
    return model


def decode(raw: bytes | None) -> Envelope[Any]:
    """Parse and validate a message from the wire, or raise PoisonMessage saying why."""
    if raw is None:
        raise PoisonMessage("empty message (tombstone)")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PoisonMessage("not a JSON object")
    try:
        header = _Header.model_validate(document)
    except ValidationError as exc:
        raise PoisonMessage(f"bad envelope: {_errors(exc)}") from None
    data_class = EVENT_TYPES.get(header.type)
    if data_class is None:
        raise PoisonMessage(f"unknown event type {header.type!r}")
    if header.version > data_class.VERSION:
        raise PoisonMessage(
            f"{header.type} version {header.version} is newer than"
            f" this reader's {data_class.VERSION}"
        )
    try:
        return _envelope_model(data_class).model_validate(document)
    except ValidationError as exc:
        raise PoisonMessage(f"bad {header.type}: {_errors(exc)}") from None


def _errors(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors()[:5]
    ]
    return "; ".join(parts)
