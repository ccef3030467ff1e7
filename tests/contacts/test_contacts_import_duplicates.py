"""An import names the rows a later row of the same address replaced, and stays right when
another session changes the same contacts while it applies (its plain INSERT falls back)."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from contacts import domain, store
from herald import db as herald_db
from herald.devinfra.stack import Stack
from tests.contacts.conftest import Account


async def test_duplicate_rows_are_counted_and_named_with_the_row_that_replaced_them(
    account: Account,
):
    tag = uuid.uuid4().hex[:8]
    lines = [
        "email,first_name,city",
        f"a-{tag}@example.com,Ann,Paris",  # row 2: replaced by row 7
        f"b-{tag}@example.com,Ben,Rome",  # row 3: replaced by row 6
        f"A-{tag}@EXAMPLE.com,Anna,",  # row 4: the same address; replaced by row 7
        f"c-{tag}@example.com,Cy,Oslo",
        f"b-{tag}@example.com,,Bern",
        f"a-{tag}@example.com,Annie,",
        "not-an-address,X,Y",
    ]
    job = await account.finished_import(("\r\n".join(lines) + "\r\n").encode())
    assert job["status"] == "succeeded", job
    assert (job["rows_read"], job["created"], job["updated"]) == (7, 3, 0), job
    assert (job["error_count"], job["duplicate_count"], job["skipped"]) == (1, 3, 4), job
    assert job["duplicates"] == [
        {"row": 2, "kept_row": 7},
        {"row": 3, "kept_row": 6},
        {"row": 4, "kept_row": 7},
    ]
    everyone = {c["email"]: c for c in await account.all_contacts()}
    # The last row of an address wins, whole: no cell of an earlier row is kept.
    assert everyone[f"a-{tag}@example.com"]["first_name"] == "Annie"
    assert everyone[f"a-{tag}@example.com"]["attributes"] == {}
    assert everyone[f"b-{tag}@example.com"]["first_name"] is None
    assert everyone[f"b-{tag}@example.com"]["attributes"] == {"city": "Bern"}
    # Without duplicates the report says so.
    again = await account.finished_import(f"email\r\nd-{tag}@example.com\r\n".encode())
    assert (again["duplicate_count"], again["duplicates"], again["skipped"]) == (0, [], 0)


async def test_addresses_alike_only_to_the_database_are_duplicates_too(account: Account):
    # Python folds the final capital sigma of row 2 to U+03C2, PostgreSQL's lower() (which the
    # unique index uses) to U+03C3, as row 3 has it: for the database one address, twice.
    tag = uuid.uuid4().hex[:8]
    lines = [
        "email,first_name",
        f"{tag}ΟΔΥΣΣΕΑΣ@example.com,Upper",
        f"{tag}οδυσσεασ@example.com,Lower",
    ]
    job = await account.finished_import(("\n".join(lines) + "\n").encode())
    assert job["status"] == "succeeded", job
    assert (job["created"], job["duplicate_count"]) == (1, 1), job
    assert job["duplicates"] == [{"row": 2, "kept_row": 3}]
    [contact] = [c for c in await account.all_contacts() if c["email"].startswith(tag)]
    assert contact["first_name"] == "Lower"


async def test_only_the_first_duplicate_rows_are_named_but_all_are_counted(account: Account):
    tag = uuid.uuid4().hex[:8]
    # 150 addresses twice, then the first ten a third time: rows 2-151 are replaced (by rows
    # 302-311 for the first ten addresses, by rows 162-301 for the rest), and rows 152-161.
    addresses = [f"r{i}-{tag}@example.com" for i in range(150)]
    lines = ["email", *addresses, *addresses, *addresses[:10]]
    job = await account.finished_import(("\n".join(lines) + "\n").encode())
    assert job["status"] == "succeeded", job
    assert (job["created"], job["duplicate_count"], job["skipped"]) == (150, 160, 160), job
    named = job["duplicates"]
    assert len(named) == 100  # CONTACTS_IMPORT_ERRORS, the default
    assert [d["row"] for d in named] == list(range(2, 102))
    assert named[0] == {"row": 2, "kept_row": 302}
    assert named[10] == {"row": 12, "kept_row": 162}


# -- applying while another session writes -------------------------------------------------


@pytest.fixture
async def conns(infra: Stack) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """Two sessions on the contacts schema: the import's and another writer's."""
    importing = await herald_db.connect(infra.database_url, schema="contacts")
    other = await herald_db.connect(infra.database_url, schema="contacts")
    try:
        yield importing, other
    finally:
        await importing.close()
        await other.close()


def _staged(row_no: int, email: str, first_name: str) -> domain.StagedRow:
    return (row_no, email, domain.email_key(email), first_name, None, '{"src": "import"}')


async def _waiting_for_a_lock(watcher: asyncpg.Connection, pid: int) -> None:
    deadline = time.monotonic() + 10
    while not await watcher.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
    ):
        assert time.monotonic() < deadline, "the import never waited for the other session"
        await asyncio.sleep(0.02)


async def _apply_while(
    importing: asyncpg.Connection,
    other: asyncpg.Connection,
    watcher: asyncpg.Connection,
    *,
    account_id: uuid.UUID,
    rows: list[domain.StagedRow],
    meanwhile: str,
) -> tuple[int, int]:
    """Stage `rows`, run `meanwhile` in another session's open transaction, start applying,
    and commit the other session only once the import waits for it."""
    other_tx = other.transaction()
    await other_tx.start()
    await other.execute(meanwhile, account_id)
    async with importing.transaction():
        await store.create_staging(importing)
        await store.copy_staged(importing, records=rows)
        assert await store.drop_duplicates(importing, keep=10) == (0, [])
        applying = asyncio.ensure_future(
            store.apply_import(importing, account_id=account_id, list_id=None, staged=len(rows))
        )
        try:
            await _waiting_for_a_lock(watcher, importing.get_server_pid())
        finally:
            await other_tx.commit()
        return await applying


async def test_an_address_another_session_inserts_meanwhile_is_updated(
    conns: tuple[asyncpg.Connection, asyncpg.Connection], infra: Stack
):
    importing, other = conns
    account_id = uuid.uuid4()
    watcher = await herald_db.connect(infra.database_url, schema="contacts")
    try:
        counts = await _apply_while(
            importing,
            other,
            watcher,
            account_id=account_id,
            rows=[_staged(2, "race@example.com", "Imported"), _staged(3, "new@example.com", "N")],
            meanwhile="""INSERT INTO contacts (account_id, email, first_name, last_name)
                         VALUES ($1, 'Race@example.com', 'Typed', 'Kept')""",
        )
        rows = await watcher.fetch(
            """SELECT email, first_name, last_name, attributes FROM contacts
                WHERE account_id = $1 ORDER BY lower(email)""",
            account_id,
        )
    finally:
        await watcher.close()
    # Not a unique violation: the address the other session added is updated, not created.
    assert counts == (1, 1)
    assert [tuple(r) for r in rows] == [
        ("new@example.com", "N", None, {"src": "import"}),
        ("Race@example.com", "Imported", "Kept", {"src": "import"}),
    ]


async def test_a_contact_another_session_deletes_meanwhile_is_created_again(
    conns: tuple[asyncpg.Connection, asyncpg.Connection], infra: Stack
):
    importing, other = conns
    account_id = uuid.uuid4()
    await other.execute(
        "INSERT INTO contacts (account_id, email, first_name) VALUES ($1, 'gone@example.com', 'G')",
        account_id,
    )
    watcher = await herald_db.connect(infra.database_url, schema="contacts")
    try:
        counts = await _apply_while(
            importing,
            other,
            watcher,
            account_id=account_id,
            rows=[_staged(2, "gone@example.com", "Back"), _staged(3, "kept@example.com", "K")],
            meanwhile="DELETE FROM contacts WHERE account_id = $1 AND email = 'gone@example.com'",
        )
        rows = await watcher.fetch(
            "SELECT email, first_name FROM contacts WHERE account_id = $1 ORDER BY email",
            account_id,
        )
    finally:
        await watcher.close()
    # The statement's snapshot still saw the contact, so it neither updated nor created it;
    # the import noticed the row missing and applied everything again with ON CONFLICT.
    assert counts == (2, 0)
    assert [tuple(r) for r in rows] == [("gone@example.com", "Back"), ("kept@example.com", "K")]
