"""The scheduler's two loops: firing due timers, and fanning fired emails out to delivery batches.

Timers fire under `SELECT … FOR UPDATE SKIP LOCKED`, so among replicas each due timer is taken by
exactly one, and marking it fired, opening its fan-out and announcing `EmailFanoutStarted` commit
together. A fan-out then walks the audience (literal addresses first, then the contacts service's
pages) one batch per transaction: the batch's outbox row and the fan-out's new position commit
together, guarded by the position it started from. A replica that dies part way leaves the last
committed position behind; whoever takes the fan-out over (after its lease runs out) resumes there,
and a replica that lost it cannot commit a batch twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from herald import db, outbox
from herald.events import Envelope
from herald.events.campaign import EmailScheduled
from herald.events.scheduler import DispatchBatch, EmailFannedOut, EmailFanoutStarted
from scheduler import domain, store
from scheduler.contacts import ContactsClient, ContactsRefused, ContactsUnavailable, RecipientsPage
from scheduler.metrics import (
    BATCHES_QUEUED,
    CONTACTS_ERRORS,
    FANOUT_SECONDS,
    FANOUTS,
    RECIPIENTS_QUEUED,
    TIMER_LATENESS,
    TIMERS_FIRED,
    TIMERS_PENDING,
)

log = logging.getLogger(__name__)


class _Stopper:
    """A stop flag with an interruptible sleep, shared by the loops below."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)
        self.wake.clear()


class TimerPoller(_Stopper):
    """Fires due timers every `poll_interval` seconds until stopped."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        poll_interval: float,
        on_fired: Callable[[], None] | None = None,
        limit: int = 100,
    ) -> None:
        super().__init__()
        self._pool = pool
        self._poll_interval = poll_interval
        self._on_fired = on_fired
        self._limit = limit

    async def run(self) -> None:
        """Poll until stopped; database outages are waited out."""
        polls = 0
        while not self.stopping.is_set():
            try:
                fired = await self.fire_due()
                if polls % 20 == 0:
                    async with self._pool.acquire() as conn:
                        TIMERS_PENDING.set(await store.pending_timers(conn))
                polls += 1
            except Exception as exc:
                if not db.is_connection_error(exc):
                    log.exception("timer poll failed", exc_info=exc)
                else:
                    log.warning("database unreachable, timers wait", extra={"error": repr(exc)})
                fired = 0
            if fired < self._limit:
                await self.sleep(self._poll_interval)

    async def fire_due(self) -> int:
        """Fire the timers that are due now; returns how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            due = await store.claim_due_timers(conn, limit=self._limit)
            for timer in due:
                await store.fire_timer(conn, email_id=timer["email_id"], revision=timer["revision"])
                started = EmailFanoutStarted(email_id=timer["email_id"], revision=timer["revision"])
                await outbox.write(conn, Envelope.wrap(started, account_id=timer["account_id"]))
        now = datetime.now(UTC)
        for timer in due:
            TIMERS_FIRED.inc()
            TIMER_LATENESS.observe(max((now - timer["send_at"]).total_seconds(), 0.0))
            log.info("timer fired", extra={"email_id": str(timer["email_id"])})
        if due and self._on_fired is not None:
            self._on_fired()
        return len(due)


class _Lost(Exception):
    """The fan-out was taken over by another replica, or cancelled."""


class FanoutRunner(_Stopper):
    """Claims running fan-outs and hands their audience out in batches, until stopped."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        contacts: ContactsClient,
        batch_size: int,
        lease_seconds: float,
        idle_interval: float = 1.0,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
    ) -> None:
        super().__init__()
        self.owner = uuid.uuid4()
        self._pool = pool
        self._contacts = contacts
        self._batch_size = batch_size
        self._lease = lease_seconds
        self._idle_interval = idle_interval
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay

    async def run(self) -> None:
        """Run fan-outs one after another until stopped."""
        while not self.stopping.is_set():
            try:
                ran = await self.run_one()
            except Exception as exc:
                log.warning("fan-out interrupted, will resume", extra={"error": repr(exc)})
                ran = False
            if not ran:
                await self.sleep(self._idle_interval)

    async def run_one(self) -> bool:
        """Claim one fan-out and run it to its end; False if there was none to claim."""
        async with self._pool.acquire() as conn:
            job = await store.claim_fanout(conn, owner=self.owner, lease_seconds=self._lease)
        if job is None:
            return False
        email_id: uuid.UUID = job["email_id"]
        try:
            await self._fan_out(job)
        except _Lost:
            log.info("fan-out taken over or cancelled", extra={"email_id": str(email_id)})
        finally:
            if self.stopping.is_set():
                with contextlib.suppress(Exception):
                    async with self._pool.acquire() as conn:
                        await store.release_fanout(conn, email_id=email_id, owner=self.owner)
        return True

    async def _fan_out(self, job: asyncpg.Record) -> None:
        scheduled = EmailScheduled.model_validate(job["payload"])
        audience = scheduled.audience
        to = domain.unique_addresses(audience.to)
        literal = {a.lower() for a in to}
        has_contacts = bool(audience.list_ids or audience.contact_ids)
        progress = domain.Progress(
            phase=job["phase"],
            to_offset=job["to_offset"],
            cursor=job["cursor"],
            batch_no=job["batch_no"],
            total=job["total"],
        )
        # Pages asked for ahead of time, by cursor: the next page is fetched while a batch commits.
        ahead: dict[str | None, asyncio.Task[RecipientsPage]] = {}
        try:
            await self._walk(job, scheduled, progress, to, literal, has_contacts, ahead)
        finally:
            for task in ahead.values():
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: an error of a page no longer wanted is moot
                else:
                    task.cancel()

    async def _walk(
        self,
        job: asyncpg.Record,
        scheduled: EmailScheduled,
        progress: domain.Progress,
        to: list[str],
        literal: set[str],
        has_contacts: bool,
        ahead: dict[str | None, asyncio.Task[RecipientsPage]],
    ) -> None:
        account_id: uuid.UUID | None = job["account_id"]
        email_id = scheduled.email_id
        while True:
            if self.stopping.is_set():
                return
            try:
                if progress.phase == "to":
                    chunk = to[progress.to_offset : progress.to_offset + self._batch_size]
                    suppressed = (
                        set()
                        if scheduled.kind == "system" or account_id is None
                        else await self._contacts.suppressed(account_id=account_id, emails=chunk)
                    )
                    step = domain.literal_step(
                        progress,
                        to=to,
                        suppressed=suppressed,
                        batch_size=self._batch_size,
                        has_contacts=has_contacts,
                    )
                else:
                    if account_id is None:
                        raise ContactsRefused("an email without an account has no contacts")
                    step = await self._contacts_step(
                        progress, account_id, scheduled, literal, ahead
                    )
            except ContactsUnavailable as exc:
                CONTACTS_ERRORS.labels("unavailable").inc()
                delay = min(self._retry_delay * 2 ** job["attempts"], self._max_retry_delay)
                log.warning(
                    "contacts unavailable, fan-out postponed",
                    extra={"email_id": str(email_id), "error": str(exc), "retry_in": delay},
                )
                async with self._pool.acquire() as conn:
                    await store.postpone_fanout(
                        conn,
                        email_id=email_id,
                        owner=self.owner,
                        delay_seconds=delay,
                        error=str(exc),
                    )
                return
            except ContactsRefused as exc:
                CONTACTS_ERRORS.labels("refused").inc()
                await self._commit(job, scheduled, progress, None, failed=str(exc))
                return
            await self._commit(job, scheduled, progress, step)
            progress = step.after
            if step.done:
                return

    async def _contacts_step(
        self,
        progress: domain.Progress,
        account_id: uuid.UUID,
        scheduled: EmailScheduled,
        literal: set[str],
        ahead: dict[str | None, asyncio.Task[RecipientsPage]],
    ) -> domain.Step:
        def ask(after: str | None) -> asyncio.Task[RecipientsPage]:
            if after not in ahead:
                ahead[after] = asyncio.ensure_future(
                    self._contacts.recipients(
                        account_id=account_id,
                        list_ids=scheduled.audience.list_ids,
                        contact_ids=scheduled.audience.contact_ids,
                        after=after,
                        limit=self._batch_size,
                    )
                )
            return ahead[after]

        page = await ask(progress.cursor)
        del ahead[progress.cursor]
        last = page.next_cursor is None
        if not last:
            # One page ahead, so the final batch can say it is the final one; and the page after
            # that is asked for now, to arrive while this batch commits.
            peek = await ask(page.next_cursor)
            last = not peek.items and peek.next_cursor is None
            if peek.next_cursor is not None:
                ask(peek.next_cursor)
        return domain.contacts_step(
            progress, page=page.items, next_cursor=page.next_cursor, literal=literal, last=last
        )

    async def _commit(
        self,
        job: asyncpg.Record,
        scheduled: EmailScheduled,
        before: domain.Progress,
        step: domain.Step | None,
        *,
        failed: str | None = None,
    ) -> None:
        after = step.after if step is not None else before
        done = failed is not None or (step is not None and step.done)
        outcome = "failed" if failed is not None else "completed"
        account_id = job["account_id"]
        async with self._pool.acquire() as conn, conn.transaction():
            if not await store.advance_fanout(
                conn,
                email_id=scheduled.email_id,
                owner=self.owner,
                before=before,
                after=after,
                lease_seconds=self._lease,
                finished=outcome if done else None,
            ):
                raise _Lost
            if step is not None and step.recipients:
                batch = DispatchBatch(
                    email_id=scheduled.email_id,
                    revision=scheduled.revision,
                    batch_no=before.batch_no,
                    kind=scheduled.kind,
                    content=scheduled.content,
                    template_vars=scheduled.template_vars,
                    recipients=step.recipients,
                    last_batch=step.done,
                    total_recipients=after.total if step.done else None,
                )
                await outbox.write(conn, Envelope.wrap(batch, account_id=account_id))
            if done:
                ended = EmailFannedOut(
                    email_id=scheduled.email_id,
                    revision=scheduled.revision,
                    total_recipients=after.total,
                    batches=after.batch_no,
                    outcome=outcome,
                    reason=failed[:1000] if failed is not None else None,
                )
                await outbox.write(conn, Envelope.wrap(ended, account_id=account_id))
        if step is not None and step.recipients:
            BATCHES_QUEUED.inc()
            RECIPIENTS_QUEUED.inc(len(step.recipients))
        if done:
            FANOUTS.labels(outcome).inc()
            started: datetime = job["started_at"]
            FANOUT_SECONDS.observe(max((datetime.now(UTC) - started).total_seconds(), 0.0))
            log.info(
                "fan-out finished",
                extra={
                    "email_id": str(scheduled.email_id),
                    "outcome": outcome,
                    "recipients": after.total,
                    "reason": failed,
                },
            )
