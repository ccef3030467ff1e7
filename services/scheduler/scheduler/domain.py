"""Pure rules of the scheduler: which revision wins, and how a fan-out steps through an audience."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from herald.events.scheduler import Recipient

Phase = Literal["to", "contacts"]


def unique_addresses(addresses: Iterable[str]) -> list[str]:
    """`addresses` without repeats (case-insensitive), first spelling and order kept."""
    seen: set[str] = set()
    unique = []
    for address in addresses:
        key = address.strip().lower()
        if key and key not in seen:
            seen.add(key)
            unique.append(address.strip())
    return unique


def replaces(
    *, incoming_revision: int, current_revision: int | None, current_state: str | None
) -> bool:
    """Whether a schedule of `incoming_revision` replaces the timer as it stands."""
    if current_revision is None:
        return True
    # A fired timer is past changing: its mail is going out.
    return current_state in ("pending", "cancelled") and incoming_revision > current_revision


@dataclass(frozen=True)
class Progress:
    """Where a fan-out stands: the phase, position within it, batches and recipients so far."""

    phase: Phase
    to_offset: int
    cursor: str | None
    batch_no: int
    total: int


@dataclass(frozen=True)
class Step:
    """One committed step of a fan-out: the batch to publish (maybe none) and the new position."""

    recipients: list[Recipient]
    after: Progress
    done: bool


def literal_step(
    progress: Progress,
    *,
    to: Sequence[str],
    suppressed: set[str],
    batch_size: int,
    has_contacts: bool,
) -> Step:
    """The next chunk of literal `to` addresses, less the suppressed ones."""
    chunk = to[progress.to_offset : progress.to_offset + batch_size]
    offset = progress.to_offset + len(chunk)
    recipients = [Recipient(email=a) for a in chunk if a.lower() not in suppressed]
    finished_literals = offset >= len(to)
    done = finished_literals and not has_contacts
    after = Progress(
        phase="contacts" if finished_literals else "to",
        to_offset=offset,
        cursor=None,
        batch_no=progress.batch_no + (1 if recipients else 0),
        total=progress.total + len(recipients),
    )
    return Step(recipients=recipients, after=after, done=done)


def contacts_step(
    progress: Progress,
    *,
    page: Sequence[Recipient],
    next_cursor: str | None,
    literal: set[str],
    last: bool,
) -> Step:
    """A page of resolved contacts, less those already mailed as literal addresses."""
    recipients = [r for r in page if r.email.lower() not in literal]
    after = Progress(
        phase="contacts",
        to_offset=progress.to_offset,
        cursor=next_cursor,
        batch_no=progress.batch_no + (1 if recipients else 0),
        total=progress.total + len(recipients),
    )
    return Step(recipients=recipients, after=after, done=last)
