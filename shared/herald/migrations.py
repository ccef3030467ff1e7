"""A small migration runner: numbered plain-SQL files applied once each, per service schema.

Chosen over Alembic (which wants SQLAlchemy and a synchronous driver) and yoyo (psycopg): we need
only ordered SQL files, a checksum against edits, and an advisory lock so replicas that start
together do not race. Migrations run as an explicit step (`python -m herald.migrations`), never
implicitly at service start; a service reports not-ready while any are pending.

Each schema records what it applied in `schema_migrations`, under two namespaces: `herald` for
the shared tables (outbox, inbox) and the service's own name for its tables.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from herald.db import Conn

SHARED_MIGRATIONS = Path(__file__).parent / "sql"
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    namespace: str
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    """A migration was edited after it was applied, or a file is misnamed."""


def service_migrations_dir(service: str) -> Path:
    """`services/<svc>/migrations`, found beside the service's package."""
    module = importlib.import_module(service)
    if module.__file__ is None:
        raise MigrationError(f"cannot locate the package of service {service!r}")
    return Path(module.__file__).resolve().parent.parent / "migrations"


def load(namespace: str, directory: Path) -> list[Migration]:
    """Read the numbered migrations of one namespace, in order."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILENAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: expected NNNN_name.sql")
        migrations.append(
            Migration(namespace, int(match.group(1)), match.group(2), path.read_text())
        )
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a number")
    return migrations


def migrations_for(service: str) -> list[Migration]:
    """Everything a service's schema needs: the shared tables first, then its own."""
    directory = service_migrations_dir(service)
    if not directory.is_dir():
        # An install that left the SQL behind must not "succeed" with only the shared tables.
        raise MigrationError(f"no migrations directory for {service} at {directory}")
    return load("herald", SHARED_MIGRATIONS) + load(service, directory)


async def _applied(conn: Conn, schema: str) -> dict[tuple[str, int], str]:
    exists = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations"
    )
    if not exists:
        return {}
    rows = await conn.fetch(
        f'SELECT namespace, version, checksum FROM "{schema}".schema_migrations'  # noqa: S608
    )
    return {(r["namespace"], r["version"]): r["checksum"] for r in rows}


def _check_unchanged(migrations: list[Migration], applied: dict[tuple[str, int], str]) -> None:
    for m in migrations:
        checksum = applied.get((m.namespace, m.version))
        if checksum is not None and checksum != m.checksum:
            raise MigrationError(
                f"migration {m.namespace}/{m.version:04d}_{m.name} changed after it was applied"
            )


async def pending(conn: Conn, *, schema: str, migrations: list[Migration]) -> list[Migration]:
    """Those of `migrations` not yet applied to `schema`."""
    applied = await _applied(conn, schema)
    _check_unchanged(migrations, applied)
    return [m for m in migrations if (m.namespace, m.version) not in applied]


async def migrate(conn: Conn, *, schema: str, migrations: list[Migration]) -> list[Migration]:
    """Apply what is pending, each migration in its own transaction; returns what was applied."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
        raise MigrationError(f"invalid schema name {schema!r}")
    lock_key = f"herald-migrate:{schema}"
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations (
                namespace  text NOT NULL,
                version    int  NOT NULL,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (namespace, version))"""
        )
        todo = await pending(conn, schema=schema, migrations=migrations)
        for m in todo:
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
                await conn.execute(m.sql)
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_migrations'  # noqa: S608
                    " (namespace, version, name, checksum) VALUES ($1, $2, $3, $4)",
                    m.namespace,
                    m.version,
                    m.name,
                    m.checksum,
                )
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)


async def migrate_services(dsn: str, services: list[str]) -> dict[str, list[Migration]]:
    """Migrate each service's schema (named after the service) on the server at `dsn`."""
    conn = await asyncpg.connect(dsn)
    try:
        return {s: await migrate(conn, schema=s, migrations=migrations_for(s)) for s in services}
    finally:
        await conn.close()


def main() -> None:
    from herald.settings import EMBEDDED_DATABASE_URL, SERVICE_PORTS

    parser = argparse.ArgumentParser(description="Apply Herald's database migrations.")
    parser.add_argument("services", nargs="*", help="services to migrate (default: all)")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    dsn = args.database_url or os.environ.get("DATABASE_URL") or EMBEDDED_DATABASE_URL
    services = args.services or [s for s in SERVICE_PORTS if s != "gateway"]
    for service, applied in asyncio.run(migrate_services(dsn, services)).items():
        names = ", ".join(f"{m.namespace}/{m.version:04d}_{m.name}" for m in applied) or "none"
        print(f"{service}: applied {names}")


if __name__ == "__main__":
    main()
