"""What the contacts service does, one function per operation, called by routes and handlers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import ValidationError

from contacts import domain, store
from contacts.metrics import SOFT_BOUNCES, SUPPRESSIONS
from contacts.schemas import BulkItem, ContactCreate, ContactOut, ContactPatch
from herald import outbox
from herald.db import Conn
from herald.errors import ApiError, ErrorBody, FieldError, not_found
from herald.events import Envelope
from herald.events.contacts import ContactSuppressed
from herald.links import UnsubscribeToken


def bad_cursor(field: str = "cursor") -> ApiError:
    return ApiError(422, "validation_error", "not a cursor of this API", field=field)


def after(cursor: str | None, field: str = "cursor") -> uuid.UUID:
    """The id a page starts after."""
    if cursor is None:
        return store.FIRST
    try:
        return domain.decode_cursor(cursor)
    except domain.BadCursor:
        raise bad_cursor(field) from None


def page(rows: Sequence[asyncpg.Record], limit: int) -> tuple[Sequence[asyncpg.Record], str | None]:
    """A page from `limit + 1` rows read: its items, and the cursor of the next page if there
    is one (reading one row more is how a full last page still gets a null cursor)."""
    if len(rows) > limit:
        return rows[:limit], domain.encode_cursor(rows[limit - 1]["id"])
    return rows, None


# -- contacts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    status: int
    contact: asyncpg.Record | None = None
    error: ErrorBody | None = None


def _error(status: int, code: str, message: str, field: str | None = None) -> _Outcome:
    details = [FieldError(field=field, message=message)] if field else []
    return _Outcome(status, error=ErrorBody(code=code, message=message, details=details))


async def create_contacts(
    pool: asyncpg.Pool, *, account_id: uuid.UUID, items: Sequence[ContactCreate | ErrorBody]
) -> list[_Outcome]:
    """Create contacts in one transaction; each item succeeds or fails on its own."""
    outcomes: dict[int, _Outcome] = {}
    valid: list[tuple[int, ContactCreate]] = []
    for index, item in enumerate(items):
        if isinstance(item, ErrorBody):
            outcomes[index] = _Outcome(422, error=item)
        else:
            valid.append((index, item))
    async with pool.acquire() as conn, conn.transaction():
        wanted_lists = {i for _, item in valid for i in item.list_ids}
        known = await store.existing_lists(conn, account_id=account_id, list_ids=list(wanted_lists))
        insertable: list[tuple[int, ContactCreate]] = []
        seen: set[str] = set()
        for index, item in valid:
            missing = [i for i in item.list_ids if i not in known]
            if missing:
                outcomes[index] = _error(
                    404, "not_found", f"list {missing[0]} not found", "list_ids"
                )
            elif domain.email_key(item.email) in seen:
                outcomes[index] = _error(409, "conflict", "a contact has this address", "email")
            else:
                seen.add(domain.email_key(item.email))
                insertable.append((index, item))
        rows = await store.insert_contacts(
            conn,
            account_id=account_id,
            emails=[i.email for _, i in insertable],
            first_names=[i.first_name for _, i in insertable],
            last_names=[i.last_name for _, i in insertable],
            attributes=[i.attributes for _, i in insertable],
        )
        by_key = {domain.email_key(r["email"]): r for r in rows}
        for index, item in insertable:
            row = by_key.get(domain.email_key(item.email))
            if row is None:
                outcomes[index] = _error(409, "conflict", "a contact has this address", "email")
                continue
            if item.list_ids:
                await store.add_memberships(
                    conn, account_id=account_id, list_ids=item.list_ids, contact_ids=[row["id"]]
                )
            outcomes[index] = _Outcome(201, contact=row)
    return [outcomes[i] for i in range(len(items))]


def parse_items(raw: list[Any]) -> list[ContactCreate | ErrorBody]:
    """Validate each item of a bulk create on its own."""
    parsed: list[ContactCreate | ErrorBody] = []
    for item in raw:
        try:
            parsed.append(ContactCreate.model_validate(item))
        except ValidationError as exc:
            details = [
                FieldError(field=".".join(str(p) for p in e["loc"]) or "body", message=e["msg"])
                for e in exc.errors()
            ]
            message = "; ".join(f"{d.field}: {d.message}" for d in details[:3])
            parsed.append(ErrorBody(code="validation_error", message=message, details=details))
    return parsed


def bulk_items(outcomes: Sequence[_Outcome]) -> list[BulkItem]:
    """The per-item answer of a bulk create."""
    return [
        BulkItem(
            index=i,
            status=o.status,
            contact=ContactOut.model_validate(dict(o.contact)) if o.contact else None,
            error=o.error,
        )
        for i, o in enumerate(outcomes)
    ]


async def update_contact(
    pool: asyncpg.Pool, *, account_id: uuid.UUID, contact_id: uuid.UUID, patch: ContactPatch
) -> asyncpg.Record:
    """Apply a patch; a manual unsubscribe suppresses the address and says so on Kafka."""
    given = patch.model_fields_set
    async with pool.acquire() as conn, conn.transaction():
        current = await store.get_contact(
            conn, account_id=account_id, contact_id=contact_id, for_update=True
        )
        if current is None:
            raise not_found("contact")
        email = current["email"]
        status: domain.Status = current["status"]
        if patch.email is not None and domain.email_key(patch.email) != domain.email_key(email):
            key = domain.email_key(patch.email)
            if await store.contact_by_email(conn, account_id=account_id, email=patch.email):
                raise ApiError(409, "conflict", "a contact has this address", field="email")
            reason = await store.suppression_reason(conn, account_id=account_id, email_key=key)
            status = domain.status_after_email_change(status, reason)
            email = patch.email
        elif patch.email is not None:
            email = patch.email  # the same address, perhaps in other letter case
        if "email" in given and patch.email is None:
            raise ApiError(422, "validation_error", "email cannot be removed", field="email")
        row = await store.update_contact(
            conn,
            account_id=account_id,
            contact_id=contact_id,
            email=email,
            first_name=patch.first_name if "first_name" in given else current["first_name"],
            last_name=patch.last_name if "last_name" in given else current["last_name"],
            attributes=(
                patch.attributes if patch.attributes is not None else current["attributes"]
            ),
            status=status,
        )
        assert row is not None
        if patch.status == "unsubscribed":
            await suppress(
                conn, account_id=account_id, email=row["email"], reason="manual", email_id=None
            )
            row = await store.get_contact(conn, account_id=account_id, contact_id=contact_id)
            assert row is not None
    return row


# -- suppression ----------------------------------------------------------------------------------


async def suppress(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    email: str,
    reason: domain.Reason,
    email_id: uuid.UUID | None,
) -> bool:
    """Suppress an address (and its contact); publish `contact.suppressed` if anything changed.

    Call inside a transaction. Returns whether anything changed (a repeat is a no-op).
    """
    key = domain.email_key(email)
    added = await store.suppress(
        conn, account_id=account_id, email_key=key, reason=reason, email_id=email_id
    )
    contact = await store.deactivate_contact(
        conn, account_id=account_id, email=email, status=domain.status_for(reason)
    )
    if not added and contact is None:
        return False
    SUPPRESSIONS.labels(reason).inc()
    event = ContactSuppressed(
        contact_id=contact["id"] if contact else None,
        email=contact["email"] if contact else email,
        reason=reason,
        email_id=email_id,
    )
    await outbox.write(conn, Envelope.wrap(event, account_id=account_id))
    return True


def normalise_or_lower(address: str) -> str:
    """The stored form of an address; one that does not validate is still compared by case."""
    try:
        return domain.normalise_email(address)
    except domain.InvalidEmail:
        return address.strip()


async def count_soft_bounce(conn: Conn, *, account_id: uuid.UUID, email: str) -> None:
    """Soft bounces are counted against the contact, never suppressed."""
    await store.count_soft_bounce(conn, account_id=account_id, email=normalise_or_lower(email))
    SOFT_BOUNCES.inc()


async def suppressed_among(
    conn: Conn, *, account_id: uuid.UUID, emails: Sequence[str]
) -> list[str]:
    """The normalised forms of those `emails` that must not receive campaign mail."""
    normalised = {normalise_or_lower(e) for e in emails}
    by_key = {domain.email_key(e): e for e in normalised}
    hits = await store.suppressed_among(conn, account_id=account_id, email_keys=list(by_key))
    return sorted(by_key[k] for k in hits)


# -- unsubscribe ----------------------------------------------------------------------------------


async def unsubscribe(pool: asyncpg.Pool, *, token: UnsubscribeToken) -> str:
    """Suppress the token's address at once (RFC 8058 one-click); repeating it changes nothing."""
    email = normalise_or_lower(token.r)
    async with pool.acquire() as conn, conn.transaction():
        await suppress(
            conn, account_id=token.a, email=email, reason="unsubscribed", email_id=token.e
        )
    return email


async def is_suppressed(pool: asyncpg.Pool, *, token: UnsubscribeToken) -> bool:
    """Whether the token's address is already suppressed for its account."""
    key = domain.email_key(normalise_or_lower(token.r))
    async with pool.acquire() as conn:
        return await store.suppression_reason(conn, account_id=token.a, email_key=key) is not None
