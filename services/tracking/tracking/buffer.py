"""The hot path's hand-off: a bounded in-memory buffer of answered opens and clicks, and the
worker that writes them in batches.

The pixel and click endpoints never wait for the database: they put the event here and answer.
Every `TRACKING_FLUSH_INTERVAL` (or as soon as a batch is full) the flush worker writes a batch in
one transaction: the activity rows, the recipients' state, the roll-ups (with the roll-up
changes consumers and webhooks queued) and the outbox events. Clicks wait `TRACKING_BURST_SECONDS`
before they are judged, so a scanner's burst of clicks is seen whole.

When the buffer is full (the database is slow or down), a request waits up to
`TRACKING_BUFFER_FULL_WAIT` for room, which slows the clients down; if there is still no room,
its event is dropped and counted in `herald_tracking_events_dropped_total{reason="buffer_full"}`
(the answer to the person is the same either way). A graceful shutdown writes everything left;
a crash loses what was not yet written: normally under a second of opens and clicks (plus the
burst hold for clicks), at most `TRACKING_BUFFER_MAX` events if the database was unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import replace

import asyncpg

from herald import db
from tracking import flows, store
from tracking.domain import Activity, Rollup
from tracking.machine import BurstDetector
from tracking.metrics import BUFFERED, DROPPED, FLUSH_FAILURES, FLUSH_SECONDS, RECORDED

log = logging.getLogger(__name__)


class ActivityBuffer:
    """Opens (ready at once) and clicks (ready after `hold` seconds), at most `capacity`."""

    def __init__(self, *, capacity: int, hold: float, batch: int) -> None:
        self.capacity = capacity
        self.hold = hold
        self.batch = batch
        self._opens: deque[Activity] = deque()
        self._clicks: deque[Activity] = deque()
        self._room = asyncio.Event()
        self._room.set()
        # Set when a batch is ready to write or room is wanted; the flush worker waits on it.
        self.wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._opens) + len(self._clicks)

    def offer(self, activity: Activity) -> bool:
        """Add an event if there is room; False if the buffer is full."""
        if len(self) >= self.capacity:
            self._room.clear()
            return False
        (self._opens if activity.kind == "open" else self._clicks).append(activity)
        if len(self._opens) >= self.batch:
            self.wake.set()
        return True

    async def put(self, activity: Activity, *, wait: float) -> bool:
        """Add an event, waiting up to `wait` seconds for room; False if it had to be dropped."""
        if self.offer(activity):
            return True
        deadline = time.monotonic() + wait
        while True:
            self.wake.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._room.wait(), remaining)
            except TimeoutError:
                return False
            if self.offer(activity):
                return True

    def take(self, *, now: float, everything: bool = False) -> list[Activity]:
        """Up to a batch of events ready to write (all of them when `everything`)."""
        taken: list[Activity] = []
        while self._opens and len(taken) < self.batch:
            taken.append(self._opens.popleft())
        ripe = now - self.hold
        while self._clicks and len(taken) < self.batch:
            if not everything and self._clicks[0].at.timestamp() > ripe:
                break
            taken.append(self._clicks.popleft())
        if taken:
            self._room.set()
        return taken

    def give_back(self, events: Sequence[Activity]) -> None:
        """Put events that could not be written back in front, in their order."""
        for event in reversed(events):
            (self._opens if event.kind == "open" else self._clicks).appendleft(event)

    def clicks_ready(self, now: float) -> bool:
        return bool(self._clicks) and self._clicks[0].at.timestamp() <= now - self.hold


# Errors after which the same batch is simply tried again.
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


class Flusher:
    """Writes the buffer and the queued roll-up changes, one transaction per batch."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        buffer: ActivityBuffer,
        detector: BurstDetector,
        rules: flows.Rules,
        interval: float,
    ) -> None:
        self._pool = pool
        self._buffer = buffer
        self._detector = detector
        self._rules = rules
        self._interval = interval
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        self._buffer.wake.set()

    async def run(self) -> None:
        """Flush until stopped; failures keep the batch and back off."""
        delay = 0.2
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._buffer.wake.wait(), self._interval)
            self._buffer.wake.clear()
            if self._stopping.is_set():
                break
            try:
                while await self.flush_once() and not self._stopping.is_set():
                    pass
                delay = 0.2
            except Exception as exc:
                FLUSH_FAILURES.inc()
                if isinstance(exc, _RETRYABLE):
                    continue
                level = logging.WARNING if db.is_connection_error(exc) else logging.ERROR
                log.log(level, "flush failed, will retry", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def flush_once(self, *, everything: bool = False) -> bool:
        """Write one batch; True when a full batch was written (more may be waiting)."""
        now = time.time()
        self._detector.forget_before(now - 2 * self._detector.seconds - 60)
        batch = [self._judge(e) for e in self._buffer.take(now=now, everything=everything)]
        limit = self._buffer.batch * 4
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                rollup = Rollup()
                queued = await store.drain_deltas(conn, limit=limit)
                rollup.extend(queued)
                recorded = await flows.apply_activity(conn, batch, rollup, rules=self._rules)
                await store.apply_rollup(conn, tables=rollup.tables())
        except BaseException:
            self._buffer.give_back(batch)
            raise
        finally:
            BUFFERED.set(len(self._buffer))
        if batch or queued:
            FLUSH_SECONDS.observe(time.perf_counter() - started)
        for (kind, by), n in Counter((e.kind, e.reason or "human") for e in recorded).items():
            RECORDED.labels(kind, by).inc(n)
        return len(batch) >= self._buffer.batch or len(queued) >= limit

    def _judge(self, event: Activity) -> Activity:
        if (
            event.kind == "click"
            and event.reason is None
            and self._detector.is_burst(event.message_id, event.at.timestamp())
        ):
            return replace(event, reason="link_burst")
        return event

    async def drain(self, *, grace: float) -> None:
        """Write everything left (shutdown), retrying for up to `grace` seconds."""
        deadline = time.monotonic() + grace
        delay = 0.1
        while len(self._buffer):
            try:
                await self.flush_once(everything=True)
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    lost = len(self._buffer)
                    while len(self._buffer):
                        for event in self._buffer.take(now=time.time(), everything=True):
                            DROPPED.labels(event.kind, "shutdown").inc()
                    log.error(
                        "could not write answered opens and clicks before shutting down",
                        extra={"lost": lost, "error": repr(exc)},
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
