import asyncpg
import pytest

from herald import migrations
from herald.migrations import SHARED_MIGRATIONS, Migration, MigrationError


def _ours(sql: str = "CREATE TABLE things (id int PRIMARY KEY)") -> list[Migration]:
    return [*migrations.load("herald", SHARED_MIGRATIONS), Migration("svc", 1, "things", sql)]


async def test_migrations_apply_once_into_their_own_schema(db: asyncpg.Connection, scratch_schema):
    applied = await migrations.migrate(db, schema=scratch_schema, migrations=_ours())
    assert [(m.namespace, m.version) for m in applied] == [("herald", 1), ("herald", 2), ("svc", 1)]
    assert await migrations.migrate(db, schema=scratch_schema, migrations=_ours()) == []
    assert await migrations.pending(db, schema=scratch_schema, migrations=_ours()) == []
    tables = {
        r["table_name"]
        for r in await db.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            scratch_schema,
        )
    }
    assert tables == {"outbox", "inbox", "things", "schema_migrations"}


async def test_a_new_migration_is_pending_until_applied(db: asyncpg.Connection, scratch_schema):
    await migrations.migrate(db, schema=scratch_schema, migrations=_ours())
    later = [*_ours(), Migration("svc", 2, "more", "ALTER TABLE things ADD COLUMN name text")]
    assert [
        m.version for m in await migrations.pending(db, schema=scratch_schema, migrations=later)
    ] == [2]
    await migrations.migrate(db, schema=scratch_schema, migrations=later)
    assert await migrations.pending(db, schema=scratch_schema, migrations=later) == []


async def test_an_edited_migration_is_refused(db: asyncpg.Connection, scratch_schema):
    await migrations.migrate(db, schema=scratch_schema, migrations=_ours())
    edited = _ours("CREATE TABLE things (id bigint PRIMARY KEY)")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrations.migrate(db, schema=scratch_schema, migrations=edited)


async def test_a_failing_migration_leaves_nothing_half_applied(
    db: asyncpg.Connection, scratch_schema
):
    broken = _ours("CREATE TABLE things (id int PRIMARY KEY); SELECT no_such_function()")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrations.migrate(db, schema=scratch_schema, migrations=broken)
    assert await db.fetchval("SELECT to_regclass($1)", f"{scratch_schema}.things") is None
    assert [
        m.namespace for m in await migrations.pending(db, schema=scratch_schema, migrations=_ours())
    ] == ["svc"]


async def test_every_service_has_valid_migrations_applied(db: asyncpg.Connection):
    for service in ("auth", "contacts", "campaign", "scheduler", "dispatcher", "tracking"):
        assert (
            await migrations.pending(
                db, schema=service, migrations=migrations.migrations_for(service)
            )
            == []
        )
