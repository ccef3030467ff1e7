"""All SQL of the contacts service."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from contacts.domain import email_key
from herald.db import Conn

# Before every id: the first keyset page starts "after" it.
FIRST = uuid.UUID(int=0)

_CONTACT = """id, email, first_name, last_name, attributes, status, soft_bounces, created_at,
    updated_at"""
_C_CONTACT = """c.id, c.email, c.first_name, c.last_name, c.attributes, c.status, c.soft_bounces,
    c.created_at, c.updated_at"""
# The status a contact takes when its address is on the suppression list (`sup`).
_STATUS_FROM_SUPPRESSION = """CASE WHEN sup.reason IS NULL THEN 'active'
    WHEN sup.reason IN ('bounced', 'complained') THEN sup.reason ELSE 'unsubscribed' END"""


# -- contacts -------------------------------------------------------------------------------------


async def insert_contacts(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    emails: Sequence[str],
    first_names: Sequence[str | None],
    last_names: Sequence[str | None],
    attributes: Sequence[dict[str, Any]],
) -> list[asyncpg.Record]:
    """Insert new contacts in the order given; addresses already present are left out."""
    return list(
        await conn.fetch(
            f"""INSERT INTO contacts (account_id, email, first_name, last_name, attributes,
                                      status)
                SELECT $1, n.email, n.first_name, n.last_name, n.attributes,
                       {_STATUS_FROM_SUPPRESSION}
                  FROM unnest($2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[])
                       WITH ORDINALITY AS n(email, first_name, last_name, attributes, key, ord)
                  LEFT JOIN suppressions sup
                         ON sup.account_id = $1 AND sup.email_lower IN (n.key, lower(n.email))
                 ORDER BY n.ord
                ON CONFLICT (account_id, lower(email)) DO NOTHING
                RETURNING {_CONTACT}""",
            account_id,
            list(emails),
            list(first_names),
            list(last_names),
            list(attributes),
            # Suppressions are keyed by Python's fold (see _SAME_ADDRESS).
            [email_key(e) for e in emails],
        )
    )


async def get_contact(
    conn: Conn, *, account_id: uuid.UUID, contact_id: uuid.UUID, for_update: bool = False
) -> asyncpg.Record | None:
    """One contact of the account."""
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT {_CONTACT} FROM contacts WHERE account_id = $1 AND id = $2{lock}",
        account_id,
        contact_id,
    )


async def contact_by_email(
    conn: Conn, *, account_id: uuid.UUID, email: str
) -> asyncpg.Record | None:
    """The account's contact with this address (compared case-insensitively)."""
    return await conn.fetchrow(
        f"SELECT {_CONTACT} FROM contacts WHERE account_id = $1 AND {_SAME_ADDRESS}",
        account_id,
        email_key(email),
        email,
    )


# The contact of an address ($2 its key, $3 the address itself). Python's str.lower and
# PostgreSQL's lower() fold a few letters differently (a final capital sigma becomes U+03C2
# in one, U+03C3 in the other), and the unique index is on lower(email) while suppressions
# are keyed by Python's fold: either fold names the contact. Both are constants, so the
# address index still serves.
_SAME_ADDRESS = "lower(email) IN ($2, lower($3))"


def _filters(first_param: int, *, status: str | None, q: str | None, alias: str) -> str:
    """Constant SQL fragments for the optional filters, numbering parameters from `first_param`."""
    sql, n = "", first_param
    if status is not None:
        sql += f" AND {alias}status = ${n}"
        # Lets the planner use the small partial index for the rare statuses.
        if status != "active":
            sql += f" AND {alias}status <> 'active'"
        n += 1
    if q is not None:
        # Both sides lower-cased by the database, so they fold alike (Python's str.lower does
        # not always agree, as with "İ"); a constant lower($n) still lets the address index
        # serve. The names are searched through their one GIN index (migration 0004).
        sql += (
            f" AND (starts_with(lower({alias}email), lower(${n}))"
            f" OR contact_name_terms({alias}account_id, {alias}first_name, {alias}last_name)"
            f" @@ contact_name_query($1, ${n}))"
        )
        n += 1
    return sql


async def page_contacts(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    after: uuid.UUID,
    limit: int,
    list_id: uuid.UUID | None = None,
    status: str | None = None,
    q: str | None = None,
) -> list[asyncpg.Record]:
    """A keyset page of the account's contacts (of one list, when given), in id order."""
    extra = [v for v in (status, q) if v is not None]
    if list_id is None:
        filters = _filters(4, status=status, q=q, alias="")
        sql = f"""SELECT {_CONTACT} FROM contacts
                   WHERE account_id = $1 AND id > $2{filters}
                   ORDER BY id LIMIT $3"""
        return list(await conn.fetch(sql, account_id, after, limit, *extra))
    filters = _filters(5, status=status, q=q, alias="c.")
    sql = f"""SELECT {_C_CONTACT} FROM memberships m
                JOIN contacts c ON c.account_id = m.account_id AND c.id = m.contact_id
               WHERE m.account_id = $1 AND m.list_id = $4 AND m.contact_id > $2{filters}
               ORDER BY m.contact_id LIMIT $3"""
    return list(await conn.fetch(sql, account_id, after, limit, list_id, *extra))


async def update_contact(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    contact_id: uuid.UUID,
    email: str,
    first_name: str | None,
    last_name: str | None,
    attributes: dict[str, Any],
    status: str,
) -> asyncpg.Record | None:
    """Store a contact's new fields."""
    return await conn.fetchrow(
        f"""UPDATE contacts
               SET email = $3, first_name = $4, last_name = $5, attributes = $6, status = $7,
                   updated_at = now()
             WHERE account_id = $1 AND id = $2
         RETURNING {_CONTACT}""",
        account_id,
        contact_id,
        email,
        first_name,
        last_name,
        attributes,
        status,
    )


async def delete_contact(conn: Conn, *, account_id: uuid.UUID, contact_id: uuid.UUID) -> bool:
    """Delete a contact and its memberships (its suppression, if any, stays)."""
    deleted = await conn.fetchval(
        "DELETE FROM contacts WHERE account_id = $1 AND id = $2 RETURNING true",
        account_id,
        contact_id,
    )
    return bool(deleted)


async def existing_contacts(
    conn: Conn, *, account_id: uuid.UUID, contact_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """Those of `contact_ids` that are the account's."""
    rows = await conn.fetch(
        "SELECT id FROM contacts WHERE account_id = $1 AND id = ANY($2::uuid[])",
        account_id,
        list(contact_ids),
    )
    return {r["id"] for r in rows}


# -- lists ----------------------------------------------------------------------------------------

_LIST = "id, name, description, created_at, updated_at"


async def insert_list(
    conn: Conn, *, account_id: uuid.UUID, name: str, description: str | None
) -> asyncpg.Record | None:
    """A new list; None if the account has a list of that name."""
    return await conn.fetchrow(
        f"""INSERT INTO lists (account_id, name, description) VALUES ($1, $2, $3)
            ON CONFLICT (account_id, lower(name)) DO NOTHING
            RETURNING {_LIST}, 0::bigint AS member_count""",
        account_id,
        name,
        description,
    )


async def get_list(
    conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID
) -> asyncpg.Record | None:
    """One list of the account, with its member count."""
    return await conn.fetchrow(
        f"""SELECT {_LIST},
                   (SELECT count(*) FROM memberships m
                     WHERE m.account_id = l.account_id AND m.list_id = l.id) AS member_count
              FROM lists l WHERE account_id = $1 AND id = $2""",
        account_id,
        list_id,
    )


async def page_lists(
    conn: Conn, *, account_id: uuid.UUID, after: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    """A keyset page of the account's lists with member counts."""
    return list(
        await conn.fetch(
            f"""SELECT {_LIST},
                       (SELECT count(*) FROM memberships m
                         WHERE m.account_id = l.account_id AND m.list_id = l.id) AS member_count
                  FROM lists l WHERE account_id = $1 AND id > $2
                 ORDER BY id LIMIT $3""",
            account_id,
            after,
            limit,
        )
    )


async def update_list(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    list_id: uuid.UUID,
    name: str | None,
    description: str | None,
    set_description: bool,
) -> asyncpg.Record | None:
    """Rename or describe a list."""
    return await conn.fetchrow(
        f"""UPDATE lists SET name = coalesce($3, name),
                   description = CASE WHEN $5 THEN $4 ELSE description END, updated_at = now()
             WHERE account_id = $1 AND id = $2
         RETURNING {_LIST}""",
        account_id,
        list_id,
        name,
        description,
        set_description,
    )


async def list_name_taken(
    conn: Conn, *, account_id: uuid.UUID, name: str, other_than: uuid.UUID
) -> bool:
    """Whether another list of the account has this name (case-insensitively)."""
    taken = await conn.fetchval(
        "SELECT true FROM lists WHERE account_id = $1 AND lower(name) = lower($2) AND id <> $3",
        account_id,
        name,
        other_than,
    )
    return bool(taken)


async def delete_list(conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID) -> bool:
    """Delete a list and its memberships (the contacts stay)."""
    deleted = await conn.fetchval(
        "DELETE FROM lists WHERE account_id = $1 AND id = $2 RETURNING true", account_id, list_id
    )
    return bool(deleted)


async def existing_lists(
    conn: Conn, *, account_id: uuid.UUID, list_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """Those of `list_ids` that are the account's."""
    rows = await conn.fetch(
        "SELECT id FROM lists WHERE account_id = $1 AND id = ANY($2::uuid[])",
        account_id,
        list(list_ids),
    )
    return {r["id"] for r in rows}


async def add_memberships(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    list_ids: Sequence[uuid.UUID],
    contact_ids: Sequence[uuid.UUID],
) -> int:
    """Put each contact on each list; returns how many memberships are new."""
    added = await conn.fetchval(
        """WITH added AS (
               INSERT INTO memberships (account_id, list_id, contact_id)
               SELECT $1, l, c FROM unnest($2::uuid[]) l, unnest($3::uuid[]) c
               ON CONFLICT DO NOTHING RETURNING 1)
           SELECT count(*) FROM added""",
        account_id,
        list(list_ids),
        list(contact_ids),
    )
    return int(added)


async def remove_memberships(
    conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID, contact_ids: Sequence[uuid.UUID]
) -> int:
    """Take contacts off a list; returns how many were on it."""
    removed = await conn.fetchval(
        """WITH removed AS (
               DELETE FROM memberships
                WHERE account_id = $1 AND list_id = $2 AND contact_id = ANY($3::uuid[])
               RETURNING 1)
           SELECT count(*) FROM removed""",
        account_id,
        list_id,
        list(contact_ids),
    )
    return int(removed)


async def lists_of(conn: Conn, *, account_id: uuid.UUID, contact_id: uuid.UUID) -> list[uuid.UUID]:
    """The lists a contact is on."""
    rows = await conn.fetch(
        "SELECT list_id FROM memberships WHERE account_id = $1 AND contact_id = $2",
        account_id,
        contact_id,
    )
    return [r["list_id"] for r in rows]


# -- suppression ----------------------------------------------------------------------------------


async def suppress(
    conn: Conn, *, account_id: uuid.UUID, email_key: str, reason: str, email_id: uuid.UUID | None
) -> bool:
    """Put an address on the account's suppression list; False if it was already there."""
    inserted = await conn.fetchval(
        """INSERT INTO suppressions (account_id, email_lower, reason, email_id)
           VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true""",
        account_id,
        email_key,
        reason,
        email_id,
    )
    return bool(inserted)


async def suppression_reason(conn: Conn, *, account_id: uuid.UUID, email_key: str) -> str | None:
    """Why an address is suppressed, or None."""
    reason: str | None = await conn.fetchval(
        "SELECT reason FROM suppressions WHERE account_id = $1 AND email_lower = $2",
        account_id,
        email_key,
    )
    return reason


async def deactivate_contact(
    conn: Conn, *, account_id: uuid.UUID, email: str, status: str
) -> asyncpg.Record | None:
    """Give the active contact with this address `status`; None if there is none active."""
    return await conn.fetchrow(
        f"""UPDATE contacts SET status = $4, updated_at = now()
            WHERE account_id = $1 AND {_SAME_ADDRESS} AND status = 'active'
        RETURNING id, email""",
        account_id,
        email_key(email),
        email,
        status,
    )


async def count_soft_bounce(conn: Conn, *, account_id: uuid.UUID, email: str) -> None:
    """Count a soft bounce against the contact with this address."""
    await conn.execute(
        f"""UPDATE contacts SET soft_bounces = soft_bounces + 1
            WHERE account_id = $1 AND {_SAME_ADDRESS}""",
        account_id,
        email_key(email),
        email,
    )


async def suppressed_among(
    conn: Conn, *, account_id: uuid.UUID, email_keys: Sequence[str]
) -> set[str]:
    """Those of `email_keys` on the suppression list or belonging to a contact not active."""
    rows = await conn.fetch(
        """SELECT email_lower AS k FROM suppressions
            WHERE account_id = $1 AND email_lower = ANY($2::text[])
           UNION
           SELECT lower(email) FROM contacts
            WHERE account_id = $1 AND lower(email) = ANY($2::text[]) AND status <> 'active'""",
        account_id,
        list(email_keys),
    )
    return {r["k"] for r in rows}


async def unknown_ids(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    list_ids: Sequence[uuid.UUID],
    contact_ids: Sequence[uuid.UUID],
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Which of the list and contact ids are not the account's."""
    lists = await conn.fetch(
        "SELECT id FROM lists WHERE account_id = $1 AND id = ANY($2::uuid[])", account_id, list_ids
    )
    contacts = await conn.fetch(
        "SELECT id FROM contacts WHERE account_id = $1 AND id = ANY($2::uuid[])",
        account_id,
        contact_ids,
    )
    found_lists = {r["id"] for r in lists}
    found_contacts = {r["id"] for r in contacts}
    return (
        [i for i in list_ids if i not in found_lists],
        [i for i in contact_ids if i not in found_contacts],
    )


async def recipients_page(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    list_ids: Sequence[uuid.UUID],
    contact_ids: Sequence[uuid.UUID],
    after: uuid.UUID,
    limit: int,
) -> list[asyncpg.Record]:
    """The next active contacts, in id order, that are on any of the lists or named directly;
    their attributes as JSON text (`attributes_json`), to be passed on without decoding.

    Each list contributes at most `limit` members past `after` (walking its index), so a page
    costs the same at any depth and however the lists overlap. Two spellings keep it so (the
    plans PostgreSQL chose otherwise): `c.id > after` beside `m.contact_id > after`, or the
    contacts side of the join was read from the account's first contact; and `= ANY(ARRAY(..))`
    for the page itself, or it was a hash join over every contact of the account (23 ms a page
    half way through 200,000 contacts; 1.4 ms now).
    """
    return list(
        await conn.fetch(
            """WITH wanted AS (
                   SELECT x.contact_id FROM unnest($2::uuid[]) AS l(list_id)
                   CROSS JOIN LATERAL (
                       SELECT m.contact_id FROM memberships m
                         JOIN contacts c ON c.account_id = m.account_id AND c.id = m.contact_id
                        WHERE m.account_id = $1 AND m.list_id = l.list_id
                          AND m.contact_id > $4 AND c.id > $4 AND c.status = 'active'
                        ORDER BY m.contact_id LIMIT $5) x
                   UNION
                   SELECT id FROM contacts
                    WHERE account_id = $1 AND id = ANY($3::uuid[]) AND id > $4
                      AND status = 'active')
               SELECT c.id, c.email, c.first_name, c.last_name,
                      c.attributes::text AS attributes_json
                 FROM contacts c
                WHERE c.account_id = $1 AND c.id = ANY(ARRAY(SELECT contact_id FROM wanted))
                ORDER BY c.id LIMIT $5""",
            account_id,
            list(list_ids),
            list(contact_ids),
            after,
            limit,
        )
    )


# -- import jobs ----------------------------------------------------------------------------------

_JOB = """id, status, list_id, filename, rows_read, created, updated, skipped, error_count, errors,
    duplicate_count, duplicates, failure_reason, created_at, started_at, finished_at"""


async def insert_job(
    conn: Conn,
    *,
    job_id: uuid.UUID,
    account_id: uuid.UUID,
    list_id: uuid.UUID | None,
    filename: str | None,
    runner: uuid.UUID,
) -> None:
    """Record a queued import."""
    await conn.execute(
        """INSERT INTO import_jobs (id, account_id, list_id, filename, runner)
           VALUES ($1, $2, $3, $4, $5)""",
        job_id,
        account_id,
        list_id,
        filename,
        runner,
    )


async def get_job(conn: Conn, *, account_id: uuid.UUID, job_id: uuid.UUID) -> asyncpg.Record | None:
    """One import job of the account."""
    return await conn.fetchrow(
        f"SELECT {_JOB} FROM import_jobs WHERE account_id = $1 AND id = $2", account_id, job_id
    )


async def start_job(conn: Conn, *, job_id: uuid.UUID) -> None:
    """Mark an import as running."""
    await conn.execute(
        """UPDATE import_jobs SET status = 'running', started_at = now(), updated_at = now()
            WHERE id = $1 AND status = 'queued'""",
        job_id,
    )


async def job_progress(
    conn: Conn, *, job_id: uuid.UUID, rows_read: int, error_count: int, errors: list[Any]
) -> None:
    """Record how far a running import got."""
    await conn.execute(
        """UPDATE import_jobs SET rows_read = $2, error_count = $3, errors = $4, updated_at = now()
            WHERE id = $1 AND status = 'running'""",
        job_id,
        rows_read,
        error_count,
        errors,
    )


async def finish_job(
    conn: Conn,
    *,
    job_id: uuid.UUID,
    rows_read: int,
    created: int,
    updated: int,
    error_count: int,
    errors: list[Any],
    duplicate_count: int,
    duplicates: list[Any],
) -> None:
    """Mark an import succeeded with its final counts (in the transaction that applied it)."""
    await conn.execute(
        """UPDATE import_jobs
              SET status = 'succeeded', rows_read = $2, created = $3, updated = $4,
                  skipped = $2::integer - $3::integer - $4::integer, error_count = $5, errors = $6,
                  duplicate_count = $7, duplicates = $8, finished_at = now(), updated_at = now()
            WHERE id = $1""",
        job_id,
        rows_read,
        created,
        updated,
        error_count,
        errors,
        duplicate_count,
        duplicates,
    )


async def fail_job(conn: Conn, *, job_id: uuid.UUID, reason: str) -> None:
    """Mark an import failed; nothing of it was applied."""
    await conn.execute(
        """UPDATE import_jobs
              SET status = 'failed', failure_reason = $2, created = 0, updated = 0, skipped = 0,
                  finished_at = now(), updated_at = now()
            WHERE id = $1 AND status IN ('queued', 'running')""",
        job_id,
        reason,
    )


async def hold_runner_lock(conn: Conn, *, namespace: int, runner: uuid.UUID) -> None:
    """Take the session lock that says this runner lives (held until the connection closes)."""
    await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", namespace, str(runner))


async def reap_orphaned_jobs(conn: Conn, *, namespace: int, reason: str) -> list[uuid.UUID]:
    """Fail the unfinished imports whose runner no longer holds its lock (it died)."""
    rows = await conn.fetch(
        """UPDATE import_jobs j
              SET status = 'failed', failure_reason = $2, created = 0, updated = 0,
                  skipped = 0, finished_at = now(), updated_at = now()
            WHERE status IN ('queued', 'running')
              AND NOT EXISTS (
                  SELECT 1 FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                     AND l.classid = ($1::int)::oid
                     AND l.objid = (hashtext(j.runner::text))::oid)
        RETURNING id""",
        namespace,
        reason,
    )
    return [r["id"] for r in rows]


async def create_staging(conn: Conn) -> None:
    """The import's staging table: private to the connection, gone when the transaction ends.

    A temporary table writes no WAL at all (an UNLOGGED one would still be shared, visible in
    the catalogue to every session, and need dropping after a crash)."""
    await conn.execute(
        """CREATE TEMP TABLE import_staging (
               row_no integer, email text, email_key text, first_name text, last_name text,
               attributes text) ON COMMIT DROP"""
    )
    # The import's hashes (duplicates, existing contacts) and the GIN index's pending-list
    # merges (sized by work_mem when an insert triggers them) run in memory.
    await conn.execute("SET LOCAL work_mem = '256MB'")


STAGING_COLUMNS = ("row_no", "email", "email_key", "first_name", "last_name", "attributes")


async def copy_staged(conn: Conn, *, records: Sequence[tuple[Any, ...]]) -> None:
    """COPY one chunk of checked rows into the staging table."""
    await conn.copy_records_to_table(
        "import_staging", records=records, columns=list(STAGING_COLUMNS)
    )


async def drop_duplicates(
    conn: Conn, *, keep: int, ascii_addresses: bool = False
) -> tuple[int, list[dict[str, int]]]:
    """Delete the staged rows whose address comes again later in the file (the last row of an
    address wins, whole); returns how many, and the first `keep` of them by row number, each
    with the row that replaced it (`kept_row`). `ascii_addresses`: every staged address is ASCII
    (the caller looked as it staged them)."""
    # Sizes for the planner: it then hashes the staged rows instead of guessing.
    await conn.execute("ANALYZE import_staging")
    count, first_rows = await _drop_duplicates_by(conn, "{t}.email_key", keep=keep)
    # Python's fold (email_key) and PostgreSQL's lower(), which the unique index uses, differ
    # for a few letters (a final capital sigma); two rows alike only by the database's would
    # meet twice in one upsert and fail the whole import. Rare, and never in ASCII, so looked
    # for first (a pass over the staged rows, 0.6 s a million).
    if not ascii_addresses and await conn.fetchval(
        "SELECT EXISTS (SELECT FROM import_staging WHERE email_key <> lower(email))"
    ):
        more, more_rows = await _drop_duplicates_by(conn, "lower({t}.email)", keep=keep)
        count += more
        first_rows = sorted(first_rows + more_rows, key=lambda r: r["row"])[:keep]
    return count, first_rows


async def _drop_duplicates_by(
    conn: Conn, key: str, *, keep: int
) -> tuple[int, list[dict[str, int]]]:
    # `key` names the address of the row aliased {t}. The CTE's DELETE is not visible to the
    # rest of the statement: `kept` still sees every row, and finds the last of each named
    # address in one pass.
    s_key, later_key, l_key = (key.format(t=t) for t in ("s", "later", "l"))
    row = await conn.fetchrow(
        f"""WITH gone AS (
               DELETE FROM import_staging s USING import_staging later
                WHERE {later_key} = {s_key} AND later.row_no > s.row_no
               RETURNING s.row_no, {s_key} AS k
           ), first AS (
               SELECT row_no, k FROM gone ORDER BY row_no LIMIT $1
           ), kept AS (
               SELECT {l_key} AS k, max(l.row_no) AS row_no
                 FROM import_staging l JOIN first f ON {l_key} = f.k
                GROUP BY {l_key}
           )
           SELECT (SELECT count(*) FROM gone) AS n,
                  (SELECT coalesce(json_agg(json_build_object('row', f.row_no,
                                                              'kept_row', k.row_no)
                                            ORDER BY f.row_no), '[]')
                     FROM first f JOIN kept k USING (k)) AS first_rows""",
        keep,
    )
    assert row is not None
    return int(row["n"]), list(row["first_rows"])


class _Interfered(Exception):
    """A concurrent change to the account's contacts made the fast upsert miss a row."""


async def apply_import(
    conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID | None, staged: int
) -> tuple[int, int]:
    """Apply the `staged` rows left after drop_duplicates; returns (created, updated). Empty
    cells keep what a contact had; attributes are merged. New contacts' ids come from one
    UUIDv7 and their row number (see import_contact_id)."""
    try:
        async with conn.transaction():  # a savepoint: the fallback starts from a clean slate
            created, updated = await _apply_plainly(conn, account_id=account_id, list_id=list_id)
            if created + updated != staged:
                raise _Interfered
        return created, updated
    except (asyncpg.UniqueViolationError, _Interfered):
        return await _apply_with_conflicts(conn, account_id=account_id, list_id=list_id)


async def _apply_plainly(
    conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID | None
) -> tuple[int, int]:
    # Updates the contacts whose address exists, then inserts the rest with a plain INSERT:
    # INSERT ... ON CONFLICT takes a speculative-insertion lock and writes a confirmation
    # record for every row, about 2 µs a row here, more than the address's unique index costs.
    # What this statement's snapshot cannot see - an address another session inserted, or a
    # contact it deleted, meanwhile - surfaces as a unique violation or as a row neither
    # updated nor created, and apply_import then redoes it all with ON CONFLICT.
    row = await conn.fetchrow(
        f"""WITH upd AS (
                UPDATE contacts c
                   SET first_name = coalesce(s.first_name, c.first_name),
                       last_name = coalesce(s.last_name, c.last_name),
                       attributes = c.attributes || s.attributes::jsonb,
                       updated_at = now()
                  FROM import_staging s
                 WHERE c.account_id = $1 AND lower(c.email) = s.email_key
                RETURNING c.id
            ), ins AS (
                INSERT INTO contacts (account_id, id, email, first_name, last_name, attributes,
                                      status)
                SELECT $1, import_contact_id((SELECT uuidv7()), s.row_no), s.email,
                       s.first_name, s.last_name, s.attributes::jsonb,
                       {_STATUS_FROM_SUPPRESSION}
                  FROM import_staging s
                  LEFT JOIN suppressions sup
                         ON sup.account_id = $1 AND sup.email_lower = s.email_key
                 WHERE NOT EXISTS (SELECT FROM contacts c
                                    WHERE c.account_id = $1 AND lower(c.email) = s.email_key)
                RETURNING id
            ), joined AS (
                INSERT INTO memberships (account_id, list_id, contact_id)
                SELECT $1, $2::uuid, id FROM ins WHERE $2::uuid IS NOT NULL
                UNION ALL
                SELECT $1, $2::uuid, u.id FROM upd u
                 WHERE $2::uuid IS NOT NULL
                   AND NOT EXISTS (SELECT FROM memberships m
                                    WHERE m.account_id = $1 AND m.list_id = $2::uuid
                                      AND m.contact_id = u.id)
            )
            SELECT (SELECT count(*) FROM ins) AS created, (SELECT count(*) FROM upd) AS updated""",
        account_id,
        list_id,
    )
    assert row is not None
    return int(row["created"]), int(row["updated"])


async def _apply_with_conflicts(
    conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID | None
) -> tuple[int, int]:
    row = await conn.fetchrow(
        f"""WITH up AS (
                INSERT INTO contacts AS c (account_id, id, email, first_name, last_name,
                                           attributes, status)
                SELECT $1, import_contact_id((SELECT uuidv7()), s.row_no), s.email,
                       s.first_name, s.last_name, s.attributes::jsonb,
                       {_STATUS_FROM_SUPPRESSION}
                  FROM import_staging s
                  LEFT JOIN suppressions sup
                         ON sup.account_id = $1 AND sup.email_lower = s.email_key
                ON CONFLICT (account_id, lower(email)) DO UPDATE
                   SET first_name = coalesce(EXCLUDED.first_name, c.first_name),
                       last_name = coalesce(EXCLUDED.last_name, c.last_name),
                       attributes = c.attributes || EXCLUDED.attributes,
                       updated_at = now()
                RETURNING c.id, (xmax = 0) AS inserted
            ), joined AS (
                INSERT INTO memberships (account_id, list_id, contact_id)
                SELECT $1, $2::uuid, id FROM up WHERE $2::uuid IS NOT NULL
                ON CONFLICT DO NOTHING
            )
            SELECT count(*) FILTER (WHERE inserted) AS created,
                   count(*) FILTER (WHERE NOT inserted) AS updated
              FROM up""",
        account_id,
        list_id,
    )
    assert row is not None
    return int(row["created"]), int(row["updated"])


async def analyze_contacts(conn: Conn, *, memberships: bool) -> None:
    """Refresh the planner's statistics of the contacts (and the memberships)."""
    await conn.execute("ANALYZE contacts")
    if memberships:
        await conn.execute("ANALYZE memberships")


# -- export ---------------------------------------------------------------------------------------


async def attribute_keys(
    conn: Conn, *, account_id: uuid.UUID, list_id: uuid.UUID | None, limit: int
) -> list[str]:
    """The distinct attribute names of the contacts to export (at most `limit`), sorted."""
    if list_id is None:
        rows = await conn.fetch(
            """SELECT DISTINCT k FROM contacts c, jsonb_object_keys(c.attributes) k
                WHERE c.account_id = $1 AND c.attributes <> '{}'::jsonb ORDER BY k LIMIT $2""",
            account_id,
            limit,
        )
    else:
        rows = await conn.fetch(
            """SELECT DISTINCT k FROM memberships m
                 JOIN contacts c ON c.account_id = m.account_id AND c.id = m.contact_id,
                      jsonb_object_keys(c.attributes) k
                WHERE m.account_id = $1 AND m.list_id = $3 AND c.attributes <> '{}'::jsonb
                ORDER BY k LIMIT $2""",
            account_id,
            limit,
            list_id,
        )
    return [r["k"] for r in rows]
