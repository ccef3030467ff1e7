"""A failed recipient retried later (the sender's retry-failed): it moves on, counted once."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Literal

from tracking.domain import Recipient, Rollup, record_outcome

T0 = datetime(2026, 3, 2, 9, 15, tzinfo=UTC)


def outcome(
    r: Recipient,
    rollup: Rollup,
    status: Literal["sent", "deferred", "failed"],
    attempt: int,
    at: datetime = T0,
) -> bool:
    return record_outcome(
        r, rollup, status=status, attempt=attempt, at=at, smtp_code=None, smtp_reply=None
    )


def totals(rollup: Rollup) -> Counter[str]:
    return +sum((c for _, c in rollup.tables().stats.values()), Counter())


def buckets(rollup: Rollup) -> Counter[str]:
    return +sum((c for _, c in rollup.tables().email_hourly.values()), Counter())


def fresh() -> Recipient:
    return Recipient(message_id="m1@x", email_id=uuid.uuid4(), account_id=uuid.uuid4())


def test_a_failure_sent_on_a_later_attempt_counts_only_as_sent():
    r, rollup = fresh(), Rollup()
    assert outcome(r, rollup, "failed", 3)
    assert not outcome(r, rollup, "failed", 3)  # the failure published again by the retry
    later = T0 + timedelta(days=1)
    assert outcome(r, rollup, "deferred", 4, later)
    assert outcome(r, rollup, "sent", 5, later)
    assert not outcome(r, rollup, "failed", 6, later)  # sent stays sent
    assert (r.status, r.attempts, r.sent_at) == ("sent", 5, later)
    assert totals(rollup) == Counter(sent=1, delivered=1)
    # What happened when: the failure in its hour, the deferral and the send a day later.
    assert buckets(rollup) == Counter(failed=1, deferred=1, sent=1, delivered=1)


def test_a_failure_that_fails_again_is_one_failed_recipient():
    r, rollup = fresh(), Rollup()
    assert outcome(r, rollup, "failed", 2)
    assert outcome(r, rollup, "failed", 3, T0 + timedelta(hours=2))
    assert (r.status, r.attempts) == ("failed", 3)
    assert totals(rollup) == Counter(failed=1)


def test_a_stale_attempt_does_not_reopen_a_failure():
    r, rollup = fresh(), Rollup()
    assert outcome(r, rollup, "failed", 3)
    assert not outcome(r, rollup, "deferred", 2)
    assert not outcome(r, rollup, "sent", 3)
    assert r.status == "failed"
    assert totals(rollup) == Counter(failed=1)
