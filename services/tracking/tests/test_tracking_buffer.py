"""The hot path's buffer: bounded, clicks held for the burst check, back-pressure then drops."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from tracking.buffer import ActivityBuffer
from tracking.domain import Activity


def event(kind: str = "open", at: datetime | None = None) -> Activity:
    return Activity(
        id=uuid.uuid4(),
        kind=kind,  # type: ignore[arg-type]
        source="herald",
        message_id="m",
        email_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        at=at or datetime.now(UTC),
        link_index=0 if kind == "click" else None,
        url="https://a" if kind == "click" else None,
    )


def test_opens_go_at_once_and_clicks_after_the_hold():
    buffer = ActivityBuffer(capacity=10, hold=2, batch=3)
    now = datetime.now(UTC)
    old_click, new_click = event("click", now - timedelta(seconds=5)), event("click", now)
    opens = [event() for _ in range(4)]
    for e in (old_click, new_click, *opens):
        assert buffer.offer(e)
    assert buffer.wake.is_set()  # a full batch of opens is waiting
    first = buffer.take(now=now.timestamp())
    assert first == opens[:3]
    assert buffer.take(now=now.timestamp()) == [opens[3], old_click]
    assert buffer.take(now=now.timestamp()) == []
    assert buffer.take(now=now.timestamp(), everything=True) == [new_click]

    buffer.give_back(first)
    assert buffer.take(now=now.timestamp()) == first


async def test_a_full_buffer_waits_for_room_then_gives_up():
    buffer = ActivityBuffer(capacity=2, hold=0, batch=100)
    assert buffer.offer(event())
    assert buffer.offer(event())
    assert not buffer.offer(event())
    assert not await buffer.put(event(), wait=0)
    assert not await buffer.put(event(), wait=0.05)
    assert buffer.wake.is_set()

    waiting = asyncio.ensure_future(buffer.put(event(), wait=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert len(buffer.take(now=0)) == 2
    assert await waiting
    assert len(buffer) == 1
