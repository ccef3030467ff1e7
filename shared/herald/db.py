"""The asyncpg pool of a service, confined to the service's own schema."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Pool = asyncpg.Pool
# What store functions take: a plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python values, not strings, everywhere.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    dsn: str, *, schema: str, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    """Open a pool whose connections see only `schema` (then `public`) on their search path."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings={"search_path": f"{schema},public", "application_name": schema},
        **kwargs,
    )
    if pool is None:  # only when called inside a pool, which we never do
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool


async def connect(dsn: str, *, schema: str) -> asyncpg.Connection:
    """A single connection with the same settings as the pool's (for LISTEN and locks)."""
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn, server_settings={"search_path": f"{schema},public", "application_name": schema}
    )
    await _init_connection(conn)
    return conn


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable, as opposed to a bad statement or data."""
    return isinstance(
        exc,
        (
            OSError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,
            asyncpg.exceptions.TooManyConnectionsError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
            TimeoutError,
        ),
    )
