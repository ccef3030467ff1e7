"""The delivery engine: claims queued messages, sends them over SMTP, records what happened.

The `messages` table is the queue. The consumer queues one record per recipient; this engine
claims due records in batches (`queued`/`deferred` -> `sending`, `FOR UPDATE SKIP LOCKED`, so
several dispatcher processes share a send), keeps at most `claim_batch` of them in memory, and
hands them to `smtp_concurrency` senders, each owning one persistent connection to the relay.
Outcomes are written in groups, each group in one transaction with its events in the outbox.

Who owns a `sending` record: the process whose id is in `claimed_by`. Each process holds a
PostgreSQL advisory lock on its id for as long as it lives (on a connection of its own), so a
record whose owner's lock is free belongs to a dead process. Any live process takes such
records over at once: no lease to wait out after a crash, and no live sender is ever doubted.

Exactly once, and the window SMTP leaves open. A relay accepts a message when it reads the
final `.` line, and says so afterwards; a crash between the relay reading that line and our
record saying `sent` leaves us not knowing. We make that moment a recorded one. Once the
message itself is written, its record is marked `handed_over_at` in a transaction that is left
open; then the final lines of every sender waiting at that moment are written, and only then
is the transaction committed (one transaction for all of them, so its cost is shared).
Afterwards:

* a record without `handed_over_at` was never handed over: the relay has at most an unfinished
  transaction, which it discards when the connection drops. It is sent again, safely.
* a record with `handed_over_at` but no outcome had its final line with the operating system
  before our commit (a write that stayed in our own buffer takes its mark back before the
  commit), and the operating system delivers it even after we die: the relay has the whole
  message. It is counted as sent (`ASSUMED_ACCEPTED`) and never sent again.

The window, precisely. Duplicates: a crash between the first final line of a group leaving
for the operating system and that group's COMMIT leaving for the database (microseconds of
system calls, nothing awaited in between) leaves the relay with messages our records do not
mark; they are sent again. So does a crash of the database server within wal_writer_delay of
a COMMIT, as the marks do not wait for the disk (see `HeldConnection`). Nothing else sends a
message twice. Losses: none, as long as the following hold, which is what `ASSUMED_ACCEPTED`
takes on trust:

* the relay keeps a message whose end it received even when the client is gone before the
  reply. Postfix does (it notices the client is gone only when it replies). The built-in sink
  did not until it was fixed (aiosmtpd ends a session the moment its client leaves, dropping
  the message whose end it had not yet stored); that was the lost recipient of the crash test.
  `tests/dispatcher/test_dispatcher_relay_contract.py` checks the sink for it.
* the kernel gets the final line to the relay after our process died. It does: the socket of
  a killed process is closed with FIN and what it holds is still sent. Linux closes with RST
  instead, discarding what was not yet sent, only when received data lies unread; on a
  connection whose end we wrote, the only thing the relay can have sent is its reply to that
  end, and then it has the end. A crash of the whole host (or its network) within a round trip
  of the write is not covered: the mark may outlive the bytes.
* over TLS, "written" means past the TLS layer's buffer, which is all `RelayConnection.unsent`
  can see; should the socket's buffer be full, the TLS records of a final line can still wait
  in the event loop's own transport when it is marked, and a crash then loses that message.
  (It takes a message larger than the socket buffer to a relay that reads slowly; plain SMTP
  on the same relay has no such gap.)

A relay that answers the final line with a refusal during our crash is counted as accepting
(its own bounce reaches the sender then). A relay that drops the connection after the final
line without a reply, while we live, is retried: it most likely did not take the message, and
RFC 1047 prefers a rare duplicate to a loss.

Back-pressure: the engine claims only what its bounded in-memory queue can take, senders take
the next message only when connected, and outcome recording blocks senders when it falls
behind. A relay that slows down therefore slows claiming; nothing piles up in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dispatcher import store
from dispatcher.config import Settings
from dispatcher.dkim_signing import DkimSigner
from dispatcher.domain import (
    ASSUMED_ACCEPTED,
    Pacer,
    RetryPolicy,
    Stage,
    Status,
    clean_reply,
    gave_up_reply,
    judge,
    relay_target,
)
from dispatcher.message import BuildError, Built, EmailPlan, Options, PlanError, Recipient
from dispatcher.metrics import (
    BACKLOG,
    BOUNCES,
    BUILD_SECONDS,
    CONNECTIONS,
    MESSAGES,
    QUEUE_DEPTH,
    RECOVERED,
    RELAY_ERRORS,
    SMTP_SECONDS,
)
from dispatcher.outcomes import outcome_events
from dispatcher.relay import Relay, RelayConnection, RelayLost, Reply, Unsupported, stuff
from dispatcher.tokens import TokenMint
from herald import db, inbox, outbox
from herald.events.campaign import EmailContent

log = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 64
_MAX_PENDING_OUTCOMES = 2000
_RELAY_PAUSE = (0.5, 30.0)  # reconnect back-off bounds when the relay cannot be reached
_IDLE_TRANSACTION = 1.0  # seconds a hand-over lane keeps a begun transaction for the next group


def owner_key(owner: uuid.UUID) -> int:
    """The advisory lock key of a dispatcher process's id."""
    return int.from_bytes(owner.bytes[:8], "big", signed=True)


@dataclass(slots=True)
class Job:
    """A claimed message record, as a sender needs it."""

    id: uuid.UUID
    email_id: uuid.UUID
    revision: int
    account_id: uuid.UUID
    recipient: Recipient
    attempts: int
    queued_at: datetime

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Job:
        return cls(
            id=row["id"],
            email_id=row["email_id"],
            revision=row["revision"],
            account_id=row["account_id"],
            recipient=Recipient(
                message_id=row["id"],
                email=row["recipient"],
                first_name=row["first_name"],
                last_name=row["last_name"],
                attributes=row["attributes"] or {},
            ),
            attempts=row["attempts"],
            queued_at=row["queued_at"],
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt ended, to be recorded."""

    message_id: uuid.UUID
    status: Status
    code: int | None
    reply: str
    next_attempt_at: datetime | None = None
    bounce: bool = False


class _DatabaseDown(Exception):
    """The database could not be reached; the job is kept and tried again."""


class Handover(enum.Enum):
    DONE = "done"  # the final line was written and the record marked in the same transaction
    NOT_OURS = "not_ours"  # another process took the record over: do not send
    LOST = "lost"  # the connection broke before the final line could be written


class HeldConnection:
    """A pool connection kept by one journal: its many short transactions skip the pool's
    acquire and reset round trips. Given back after any failure, so a broken one is replaced.

    With `wait_for_disk=False` its commits return before the WAL reaches the disk. The
    hand-over marks use that: a mark must survive a crash of the dispatcher, which it does the
    moment PostgreSQL has the commit, and waiting for the disk on each would bound every SMTP
    connection to one message per disk flush. Should the database server itself crash within
    the next fraction of a second (wal_writer_delay) and lose a mark, its message counts as not
    handed over and is sent again: a duplicate at worst, never a loss. Outcomes, which decide
    what is published, wait for the disk as usual (they are batched, so rarely).
    """

    def __init__(self, pool: asyncpg.Pool, *, wait_for_disk: bool = True) -> None:
        self._pool = pool
        self._wait_for_disk = wait_for_disk
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None

    async def get(self) -> PoolConnectionProxy[asyncpg.Record]:
        if self._conn is None:
            conn = await self._pool.acquire()
            if not self._wait_for_disk:
                try:
                    # Reset by the pool when the connection goes back.
                    await conn.execute("SET synchronous_commit = off")
                except BaseException:
                    await self._pool.release(conn)
                    raise
            self._conn = conn
        return self._conn

    async def give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # a broken connection cannot even say
            if conn.is_in_transaction():
                # Ended here: the pool's reset would take a transaction still open for a bug.
                async with asyncio.timeout(5):
                    await store.rollback(conn)
        with contextlib.suppress(Exception):
            await self._pool.release(conn, timeout=5)


class _Lane:
    """A connection of the hand-over journal, and whether it has an empty transaction open.

    Each group's COMMIT begins the next group's transaction in the same round trip, so that a
    group costs two round trips (mark, commit) rather than three. A transaction that has only
    begun holds no snapshot and no lock; one that no group takes soon is rolled back anyway.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._held = HeldConnection(pool, wait_for_disk=False)
        self.begun = False

    async def begin(self) -> PoolConnectionProxy[asyncpg.Record]:
        """The connection, in a transaction of its own."""
        conn = await self._held.get()
        if not self.begun:
            await store.begin(conn)
        self.begun = False
        return conn

    async def commit(self, conn: PoolConnectionProxy[asyncpg.Record]) -> None:
        """Commit the group's transaction, and begin the next one."""
        await store.commit_and_begin(conn)
        self.begun = True

    async def end_idle(self) -> None:
        """Roll back the transaction begun for a group that did not come."""
        self.begun = False
        try:
            await store.rollback(await self._held.get())
        except Exception:
            await self._held.give_back()

    async def give_back(self) -> None:
        self.begun = False
        await self._held.give_back()


class HandoverJournal:
    """Marks records `handed_over_at` and writes their final lines before committing.

    Hand-overs waiting at the same moment share one transaction. `lanes` transactions can be
    under way at once, so that senders do not queue behind a single database round trip.
    """

    def __init__(
        self, pool: asyncpg.Pool, owner: uuid.UUID, *, senders: int, lanes: int = 2
    ) -> None:
        self._lanes = [_Lane(pool) for _ in range(lanes)]
        self._owner = owner
        self._gather = max(senders // (4 * lanes), 2)
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending: list[tuple[uuid.UUID, Callable[[], bool], asyncio.Future[Handover]]] = []
        self._wake = asyncio.Event()

    async def hand_over(self, message_id: uuid.UUID, write_end: Callable[[], bool]) -> Handover:
        """Write the end of `message_id` once its mark is in an open transaction.

        `write_end` says whether the end reached the operating system; if it only reached our
        own buffer, a crash could keep it from the relay, so the mark is taken back.
        """
        future: asyncio.Future[Handover] = asyncio.get_running_loop().create_future()
        self._pending.append((message_id, write_end, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """Serve hand-overs in groups until cancelled."""
        await asyncio.gather(*(self._serve(lane) for lane in self._lanes))

    async def _serve(self, lane: _Lane) -> None:
        while True:
            if not lane.begun:
                await self._wake.wait()
            elif not self._wake.is_set():
                try:
                    async with asyncio.timeout(_IDLE_TRANSACTION):
                        await self._wake.wait()
                except TimeoutError:
                    await lane.end_idle()
                    continue
            if len(self._pending) < self._gather:
                # A moment for the other senders about to hand over: one transaction for all
                # costs about what one costs, and the wait is short next to an SMTP round trip.
                await asyncio.sleep(0.002)
            group, self._pending = self._pending, []
            self._wake.clear()
            if not group:
                continue
            self._busy += 1
            self._idle.clear()
            try:
                await self._hand_over(lane, group)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Wait for the hand-overs under way (their commits) to finish."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        """Give the lanes' connections back to the pool."""
        for lane in self._lanes:
            await lane.give_back()

    async def _hand_over(
        self,
        lane: _Lane,
        group: list[tuple[uuid.UUID, Callable[[], bool], asyncio.Future[Handover]]],
    ) -> None:
        try:
            conn = await lane.begin()
            ours = set(
                await store.mark_handed_over(conn, owner=self._owner, ids=[g[0] for g in group])
            )
        except Exception as exc:
            await lane.give_back()
            self._fail(group, exc)
            return
        unmark = []
        # From here to the COMMIT below nothing awaits: the final lines and the commit leave
        # in one go, which is the whole of the window a crash can fall into.
        for message_id, write_end, future in group:
            if message_id not in ours:
                future.set_result(Handover.NOT_OURS)
                continue
            try:
                delivered = write_end()
            except Exception:
                unmark.append(message_id)
                future.set_result(Handover.LOST)
            else:
                if not delivered:
                    unmark.append(message_id)
                future.set_result(Handover.DONE)
        try:
            if unmark:
                await store.unmark_handed_over(conn, ids=unmark)
            await lane.commit(conn)
        except Exception as exc:
            # The relay has those messages; their replies will still be recorded.
            log.warning("hand-over marks not committed", extra={"error": repr(exc)})
            await lane.give_back()

    @staticmethod
    def _fail(
        group: Sequence[tuple[uuid.UUID, Callable[[], bool], asyncio.Future[Handover]]],
        exc: BaseException,
    ) -> None:
        for _, _, future in group:
            if not future.done():
                future.set_exception(_DatabaseDown(repr(exc)))


class OutcomeJournal:
    """Records attempts in groups, each with its events, in one transaction."""

    def __init__(
        self, pool: asyncpg.Pool, owner: uuid.UUID, *, limit: int = 1000, linger: float = 0.05
    ) -> None:
        self.connection = HeldConnection(pool)
        self._owner = owner
        self._limit = limit
        # Recording can wait a little: a crash before it is covered by the hand-over mark, and
        # a few large transactions cost far less than many small ones.
        self._linger = linger
        self._pending: list[Attempt] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def record(self, attempt: Attempt) -> None:
        """Queue an attempt for recording; waits while too many are unrecorded."""
        while len(self._pending) >= _MAX_PENDING_OUTCOMES:
            self._room.clear()
            await self._room.wait()
        self._pending.append(attempt)
        self._idle.clear()
        self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued is recorded; False if that took longer than `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def unrecorded(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> set[uuid.UUID]:
        """Messages whose attempt is waiting to be recorded."""
        return {attempt.message_id for attempt in self._pending}

    async def run(self) -> None:
        """Record until cancelled; a database outage is waited out."""
        delay = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < self._limit:
                await asyncio.sleep(self._linger)
            group = self._pending[: self._limit]
            try:
                await self._record(group)
            except Exception as exc:
                log.warning("outcomes not recorded, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                self._wake.set()
                continue
            delay = 0.2
            del self._pending[: len(group)]
            if len(self._pending) < _MAX_PENDING_OUTCOMES:
                self._room.set()
            if self._pending:
                self._wake.set()
            else:
                self._idle.set()

    async def _record(self, group: Sequence[Attempt]) -> None:
        try:
            conn = await self.connection.get()
            async with conn.transaction():
                rows = await store.record_outcomes(
                    conn,
                    owner=self._owner,
                    ids=[a.message_id for a in group],
                    states=[a.status for a in group],
                    codes=[a.code for a in group],
                    replies=[a.reply for a in group],
                    next_attempts=[a.next_attempt_at for a in group],
                )
                bounced = {a.message_id for a in group if a.bounce}
                await outbox.write_many(conn, outcome_events(rows, bounced=bounced))
        except Exception:
            await self.connection.give_back()
            raise
        for state, count in Counter(row["state"] for row in rows).items():
            MESSAGES.labels(state).inc(count)
        BOUNCES.inc(sum(row["id"] in bounced for row in rows))


class Presence:
    """A connection of our own that holds this process's lock and hears of new messages."""

    def __init__(self, *, dsn: str, schema: str, owner: uuid.UUID, on_notify: Callable[[], None]):
        self._dsn = dsn
        self._schema = schema
        self._key = owner_key(owner)
        self._on_notify = on_notify
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Hold the lock until stopped, reconnecting when the connection breaks."""
        delay = 0.5
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self._dsn, schema=self._schema)
                if not await store.lock_owner(conn, key=self._key):
                    raise RuntimeError("this dispatcher's id is locked by another session")
                await conn.add_listener(f"{self._schema}_messages", self._notified)
                self.ready.set()
                delay = 0.5
                while not self._stopping.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), timeout=2.0)
                    if not self._stopping.is_set():
                        await conn.fetchval("SELECT 1")
            except Exception as exc:
                self.ready.clear()
                log.warning("lost the dispatcher's own connection", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                delay = min(delay * 2, 10.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
        self.ready.clear()

    def _notified(self, *_: object) -> None:
        self._on_notify()


class Engine:
    """Claims, sends and records messages until stopped."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        settings: Settings,
        schema: str | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.owner = uuid.uuid4()
        self._pool = pool
        self._settings = settings
        self._schema = schema or settings.db_schema
        self._relay = relay or Relay(
            relay_target(settings.smtp_url),
            timeout=settings.smtp_timeout_seconds,
            helo_name=settings.smtp_helo_name,
            tls_verify=settings.smtp_tls_verify,
            pipelining=settings.smtp_pipelining,
        )
        self._mint = TokenMint(settings.link_signing_keys.get_secret_value())
        # Checked here rather than in Settings, whose errors would quote the secrets.
        dkim_parts = (settings.dkim_domain, settings.dkim_selector, settings.dkim_private_key)
        if any(dkim_parts) and not all(dkim_parts):
            raise ValueError("DKIM needs all of DKIM_DOMAIN, DKIM_SELECTOR and DKIM_PRIVATE_KEY")
        self._dkim = (
            DkimSigner(
                domain=settings.dkim_domain or "",
                selector=settings.dkim_selector or "",
                private_key_pem=settings.dkim_private_key.get_secret_value(),
            )
            if settings.dkim_configured and settings.dkim_private_key is not None
            else None
        )
        self._options = Options(
            public_base_url=settings.public_base_url,
            message_id_domain=settings.message_id_domain,
            unsubscribe_mailbox=settings.unsubscribe_mailbox,
            return_path=settings.return_path,
        )
        self._retry = RetryPolicy(
            base_seconds=settings.retry_base_seconds,
            max_seconds=settings.retry_max_seconds,
            horizon_seconds=settings.retry_horizon_seconds,
        )
        self._pacer = Pacer(settings.send_rate, burst=1) if settings.send_rate else None
        self._account_pacers: dict[uuid.UUID, Pacer] = {}
        self._capacity = max(settings.claim_batch, settings.smtp_concurrency)
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue(self._capacity)
        self._low_water = self._capacity // 2
        self._plans: OrderedDict[tuple[uuid.UUID, int], asyncio.Future[EmailPlan | PlanError]]
        self._plans = OrderedDict()
        self._handover = HandoverJournal(pool, self.owner, senders=settings.smtp_concurrency)
        self.outcomes = OutcomeJournal(pool, self.owner)
        self._feed_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._presence = Presence(
            dsn=settings.database_url,
            schema=self._schema,
            owner=self.owner,
            on_notify=self._feed_wake.set,
        )
        self._connections: list[RelayConnection] = []
        self._senders: list[asyncio.Task[None]] = []
        self._helpers: list[asyncio.Task[None]] = []
        self._feeder: asyncio.Task[None] | None = None
        self._last_reply = 0.0
        # Ids of claimed messages this process holds (queued in memory or being sent).
        self._held: set[uuid.UUID] = set()
        self._strays: set[uuid.UUID] = set()

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine's tasks; it claims once its lock is held and orphans are settled."""
        self._helpers = [
            asyncio.ensure_future(self._presence.run()),
            asyncio.ensure_future(self._handover.run()),
            asyncio.ensure_future(self.outcomes.run()),
            asyncio.ensure_future(self._housekeep()),
        ]
        self._feeder = asyncio.ensure_future(self._feed())
        self._senders = [
            asyncio.ensure_future(self._send_loop()) for _ in range(self._settings.smtp_concurrency)
        ]
        CONNECTIONS.set_function(lambda: sum(c.connected for c in self._connections))
        QUEUE_DEPTH.set_function(self._queue.qsize)

    @property
    def running(self) -> bool:
        """Whether every task of the engine is alive."""
        tasks = [*self._helpers, *self._senders]
        if self._feeder is not None:
            tasks.append(self._feeder)
        return bool(tasks) and not any(task.done() for task in tasks)

    async def stop(self) -> None:
        """Finish the transactions under way, give back what was not started, record, close."""
        grace = self._settings.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        self._stop.set()
        self._feed_wake.set()
        if self._feeder is not None:
            await _settle(self._feeder, grace)
        unstarted: list[Job] = []
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                unstarted.append(job)
        for _ in self._senders:
            self._queue.put_nowait(None)
        if self._senders:
            _, late = await asyncio.wait(self._senders, timeout=max(deadline - time.monotonic(), 0))
            for task in late:
                task.cancel()
            await asyncio.gather(*self._senders, return_exceptions=True)
        if unstarted:
            try:
                async with self._pool.acquire() as conn:
                    await store.release(conn, owner=self.owner, ids=[j.id for j in unstarted])
            except Exception as exc:
                # Our lock goes with us: whoever comes next requeues them.
                log.warning("could not give back unsent messages", extra={"error": repr(exc)})
        await self._handover.drain(5.0)
        if not await self.outcomes.drain(max(deadline - time.monotonic(), 5.0)):
            log.warning(
                "stopping with outcomes unrecorded", extra={"count": self.outcomes.unrecorded}
            )
        self._presence.stop()
        for task in self._helpers:
            if task is not self._helpers[0]:
                task.cancel()
        await asyncio.gather(*self._helpers, return_exceptions=True)
        await self._handover.close()
        await self.outcomes.connection.give_back()

    # -- readiness and figures ----------------------------------------------------------

    async def relay_ready(self) -> bool:
        """Whether the relay answers: a reply in the last few seconds, or a fresh EHLO."""
        if time.monotonic() - self._last_reply < 5.0:
            return True
        return await self._relay.reachable()

    # -- claiming -----------------------------------------------------------------------

    async def _present(self) -> bool:
        """Wait until this process's lock is held; False if stopped first."""
        while not self._presence.ready.is_set():
            if self._stop.is_set():
                return False
            await self._pause(0.1)
        return True

    async def _feed(self) -> None:
        if not await self._present():
            return
        await self._recover_orphans()
        while not self._stop.is_set():
            room = self._capacity - self._queue.qsize()
            claimed = 0
            if room > self._low_water and self._presence.ready.is_set():
                try:
                    claimed = await self._claim(min(room, self._settings.claim_batch))
                except Exception as exc:
                    log.warning("could not claim messages", extra={"error": repr(exc)})
            if claimed:
                continue
            self._feed_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._feed_wake.wait(), timeout=self._settings.poll_interval_seconds
                )

    async def _claim(self, limit: int) -> int:
        now = time.monotonic()
        busy = [a for a, pacer in self._account_pacers.items() if pacer.busy(now)]
        async with self._pool.acquire() as conn:
            rows = await store.claim(conn, owner=self.owner, limit=limit, skip_accounts=busy)
            jobs = [Job.from_record(row) for row in rows]
            later: list[tuple[Job, float]] = []
            if self._settings.account_send_rate:
                jobs, later = self._pace_accounts(jobs, now)
            for job in jobs:
                self._hold(job)
            if later:
                wall = datetime.now(UTC)
                try:
                    await store.release(
                        conn,
                        owner=self.owner,
                        ids=[job.id for job, _ in later],
                        due_at=[wall + timedelta(seconds=delay) for _, delay in later],
                    )
                except Exception as exc:
                    # Claimed and not given back: send them now rather than strand them.
                    log.warning("could not postpone messages", extra={"error": repr(exc)})
                    for job, _ in later:
                        self._hold(job)
        return len(rows)

    def _hold(self, job: Job) -> None:
        self._held.add(job.id)
        self._queue.put_nowait(job)

    def _pace_accounts(
        self, jobs: list[Job], now: float
    ) -> tuple[list[Job], list[tuple[Job, float]]]:
        """Split claimed jobs into those an account's rate lets go now and those for later."""
        rate = self._settings.account_send_rate
        now_jobs, later = [], []
        for job in jobs:
            pacer = self._account_pacers.get(job.account_id)
            if pacer is None:
                pacer = self._account_pacers[job.account_id] = Pacer(rate, burst=max(int(rate), 1))
            delay = pacer.reserve(now)
            if delay > 0.05:
                later.append((job, delay))
            else:
                now_jobs.append(job)
        return now_jobs, later

    # -- sending ------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        connection = self._relay.connection()
        self._connections.append(connection)
        pause = _RELAY_PAUSE[0]
        try:
            while not self._stop.is_set():
                if not connection.connected:
                    try:
                        await connection.connect()
                        pause = _RELAY_PAUSE[0]
                    except RelayLost as exc:
                        RELAY_ERRORS.labels("connect").inc()
                        if pause == _RELAY_PAUSE[0]:
                            log.warning("relay unreachable", extra={"error": exc.reason})
                        await self._pause(random.uniform(pause / 2, pause))  # noqa: S311 - jitter
                        pause = min(pause * 2, _RELAY_PAUSE[1])
                        continue
                job = await self._queue.get()
                if self._queue.qsize() <= self._low_water:
                    self._feed_wake.set()
                if job is None:
                    break
                await self._deliver(connection, job)
        finally:
            self._connections.remove(connection)
            await connection.close()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _deliver(self, connection: RelayConnection, job: Job) -> None:
        delay = 0.5
        try:
            while True:
                try:
                    attempt = await self._attempt(connection, job)
                except _DatabaseDown as exc:
                    if self._stop.is_set():
                        return  # still ours and `sending`: requeued by whoever comes after us
                    log.warning(
                        "database unreachable; holding a message", extra={"error": str(exc)}
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                except Exception as exc:
                    # A fault of ours, not the message's: keep the sender, retry the message later.
                    log.exception("delivery failed unexpectedly", exc_info=exc)
                    connection.abort()
                    attempt = self._judge(job, None, f"internal error: {exc!r}", "connect")
                if attempt is not None:
                    await self.outcomes.record(attempt)
                return
        finally:
            self._held.discard(job.id)

    async def _attempt(self, connection: RelayConnection, job: Job) -> Attempt | None:
        plan = await self._plan(job)
        if isinstance(plan, PlanError):
            return Attempt(job.id, "failed", None, clean_reply(str(plan)))
        started = time.perf_counter()
        try:
            built = plan.build(job.recipient)
        except BuildError as exc:
            return Attempt(job.id, "failed", None, clean_reply(str(exc)))
        data = stuff(built.data)
        BUILD_SECONDS.observe(time.perf_counter() - started)
        if self._pacer is not None:
            wait = self._pacer.reserve(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
        started = time.perf_counter()
        try:
            return await self._transact(connection, job, built, data)
        finally:
            SMTP_SECONDS.observe(time.perf_counter() - started)

    async def _transact(
        self, connection: RelayConnection, job: Job, built: Built, data: bytes
    ) -> Attempt | None:
        try:
            refusal = await self._begin(connection, built, len(data))
        except RelayLost as exc:
            RELAY_ERRORS.labels(exc.stage).inc()
            return self._judge(job, None, exc.reason, exc.stage)
        except Unsupported as exc:
            return Attempt(job.id, "failed", None, clean_reply(str(exc)))
        self._last_reply = time.monotonic()
        if refusal is not None:
            await connection.reset()
            return self._judge(job, refusal.code, refusal.text, refusal.stage)
        try:
            # The message goes ahead of its end, so that the relay has read it by the time the
            # end arrives: a relay that drops what it had not finished when the connection
            # closes (the development sink does) then rarely loses a message to our crash.
            connection.send_body(data)
            await connection.flushed()
        except RelayLost as exc:
            connection.abort()
            return self._judge(job, None, exc.reason, exc.stage)
        try:
            handed = await self._handover.hand_over(job.id, connection.end)
        except BaseException:
            connection.abort()
            raise
        if handed is not Handover.DONE:
            connection.abort()
            if handed is Handover.NOT_OURS:
                return None
            return self._judge(job, None, "connection lost before the end of the message", "end")
        try:
            reply = await connection.finish()
        except RelayLost as exc:
            RELAY_ERRORS.labels("end").inc()
            return self._judge(
                job, None, f"no reply to the end of the message: {exc.reason}", "end"
            )
        self._last_reply = time.monotonic()
        return self._judge(job, reply.code, reply.text, "end")

    async def _begin(self, connection: RelayConnection, built: Built, size: int) -> Reply | None:
        """Open the transaction of one message; the relay's refusal, or None when it waits."""
        reused = connection.transactions > 0
        try:
            opening = await connection.begin(built.sender, (built.recipient,), size)
        except RelayLost as exc:
            if not (reused and exc.stage == "mail"):
                raise
            # The relay closed a connection that sat idle: nothing of this message was sent.
            await connection.connect()
            opening = await connection.begin(built.sender, (built.recipient,), size)
        # One recipient per transaction: each message is personal (To, Message-ID, links).
        return opening.refusal(0)

    def _judge(self, job: Job, code: int | None, text: str, stage: Stage) -> Attempt:
        verdict = judge(code, stage)
        reply = clean_reply(text)
        if verdict.status != "deferred":
            return Attempt(job.id, verdict.status, code, reply, bounce=verdict.hard_bounce)
        due = self._retry.next_attempt(
            attempt=job.attempts, queued_at=job.queued_at, now=datetime.now(UTC)
        )
        if due is None:
            return Attempt(job.id, "failed", code, gave_up_reply(job.attempts, reply))
        return Attempt(job.id, "deferred", code, reply, next_attempt_at=due)

    # -- email plans --------------------------------------------------------------------

    async def _plan(self, job: Job) -> EmailPlan | PlanError:
        key = (job.email_id, job.revision)
        future = self._plans.get(key)
        if future is not None:
            self._plans.move_to_end(key)
            if future.done():  # nearly always: skip shield's future and callbacks
                return future.result()
            return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._plans[key] = future
        try:
            async with self._pool.acquire() as conn:
                rows = await store.contents(conn, keys=[key])
        except Exception as exc:
            del self._plans[key]
            future.set_exception(_DatabaseDown(repr(exc)))
            future.exception()  # retrieved: the waiters (if any) get it, the loop stays quiet
            raise _DatabaseDown(repr(exc)) from None
        try:
            if not rows:
                raise PlanError("the email's content is not on record")
            row = rows[0]
            plan: EmailPlan | PlanError = EmailPlan(
                email_id=row["email_id"],
                account_id=row["account_id"],
                kind=row["kind"],
                content=EmailContent.model_validate(row["content"]),
                template_vars=row["template_vars"],
                options=self._options,
                mint=self._mint,
                dkim=self._dkim,
            )
        except PlanError as exc:
            log.warning("email cannot be sent", extra={"email_id": str(key[0]), "error": str(exc)})
            plan = exc
        future.set_result(plan)
        while len(self._plans) > _PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    # -- crashed processes, retention -----------------------------------------------------

    async def _recover_orphans(self) -> None:
        try:
            async with self._pool.acquire() as conn:
                owners = await store.owners_in_flight(conn, besides=self.owner)
            for owner in owners:
                await self._take_over(owner)
        except Exception as exc:
            log.warning("could not look for orphaned messages", extra={"error": repr(exc)})

    async def _take_over(self, owner: uuid.UUID, ids: Sequence[uuid.UUID] | None = None) -> None:
        """Settle `owner`'s `sending` records (all, or `ids` of ours): sent if handed over,
        due again if not. Another owner's only once its lock shows it dead."""
        async with self._pool.acquire() as conn, conn.transaction():
            if owner != self.owner and not await store.owner_is_gone(conn, key=owner_key(owner)):
                return
            settled = await store.settle_orphans(conn, owner=owner, reply=ASSUMED_ACCEPTED, ids=ids)
            requeued = await store.requeue_orphans(conn, owner=owner, ids=ids)
            await outbox.write_many(conn, outcome_events(settled))
        RECOVERED.labels("sent").inc(len(settled))
        RECOVERED.labels("requeued").inc(requeued)
        MESSAGES.labels("sent").inc(len(settled))
        log.info(
            "settled messages left in sending",
            extra={"owner": str(owner), "handed_over": len(settled), "requeued": requeued},
        )
        if requeued:
            self._feed_wake.set()

    async def _settle_strays(self) -> None:
        """Settle records claimed for us that we do not hold, as if their owner had died.

        They come from a claim whose answer was lost with the connection, or a database that
        lost our last commits in a crash. A record counts as a stray when two sweeps in a row
        find it ours but not held, so a claim whose rows are on their way is never taken for one.
        """
        try:
            async with self._pool.acquire() as conn:
                mine = set(await store.claimed_by(conn, owner=self.owner))
            unheld = mine - self._held - self.outcomes.pending_ids()
            strays = unheld & self._strays
            self._strays = unheld - strays
            if strays:
                await self._take_over(self.owner, ids=sorted(strays))
        except Exception as exc:
            log.warning("could not look for stray messages", extra={"error": repr(exc)})

    async def _housekeep(self) -> None:
        if not await self._present():
            return
        interval = max(self._settings.poll_interval_seconds * 5, 1.0)
        next_prune = time.monotonic() + 60
        while not self._stop.is_set():
            await self._pause(interval)
            await self._recover_orphans()
            await self._settle_strays()
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    BACKLOG.set(await store.backlog(conn))
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + 3600
                await self._prune()
            now = time.monotonic()
            for account in [a for a, p in self._account_pacers.items() if not p.busy(now)]:
                del self._account_pacers[account]

    async def _prune(self) -> None:
        days = self._settings.retention_days
        try:
            async with self._pool.acquire() as conn:
                # In slices, so a big backlog of old records never holds locks for long.
                for _ in range(1000):
                    if not await store.prune(conn, older_than_days=days):
                        break
                await inbox.prune(conn, older_than_days=days)
        except Exception as exc:
            log.warning("pruning failed", extra={"error": repr(exc)})


async def _settle(task: Awaitable[None], timeout: float) -> None:
    future = asyncio.ensure_future(task)
    try:
        await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        future.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await future
    except Exception as exc:
        log.warning("engine task ended with an error", extra={"error": repr(exc)})
