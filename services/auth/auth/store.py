"""All SQL of the auth service."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from herald.db import Conn

# Column list interpolated into queries below: a constant of ours, never input.
_USER_COLUMNS = """id, username, email, email_verified, pending_email, password_hash, role, status,
    display_name, timezone, default_sender_name, reply_to, daily_send_quota, tokens_valid_after,
    mfa_secret, mfa_pending_secret, mfa_last_step, created_at, updated_at"""


async def insert_user(
    conn: Conn,
    *,
    user_id: uuid.UUID,
    username: str,
    email: str,
    password_hash: str,
    role: str = "user",
    email_verified: bool = False,
) -> asyncpg.Record | None:
    """Create a user; None if the username or email is taken."""
    return await conn.fetchrow(
        f"""INSERT INTO users (id, username, email, password_hash, role, email_verified)
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING
            RETURNING {_USER_COLUMNS}""",
        user_id,
        username,
        email,
        password_hash,
        role,
        email_verified,
    )


async def taken(conn: Conn, *, username: str, email: str) -> tuple[bool, bool]:
    """Whether (the username, the email) already belong to someone."""
    row = await conn.fetchrow(
        """SELECT EXISTS (SELECT 1 FROM users WHERE username = $1) AS username,
                  EXISTS (SELECT 1 FROM users WHERE email = $2 OR pending_email = $2) AS email""",
        username,
        email,
    )
    assert row is not None
    return bool(row["username"]), bool(row["email"])


async def user_by_id(
    conn: Conn, *, user_id: uuid.UUID, lock: bool = False
) -> asyncpg.Record | None:
    """One user by id."""
    suffix = " FOR UPDATE" if lock else ""
    return await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1{suffix}", user_id)


async def user_by_email(conn: Conn, *, email: str) -> asyncpg.Record | None:
    """One user by (case-insensitive) email."""
    return await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE email = $1", email)


async def update_user(conn: Conn, *, user_id: uuid.UUID, **changes: Any) -> asyncpg.Record:
    """Set the given columns (names from code, values as parameters); returns the new row."""
    allowed = {
        "username",
        "email",
        "email_verified",
        "pending_email",
        "password_hash",
        "role",
        "status",
        "display_name",
        "timezone",
        "default_sender_name",
        "reply_to",
        "daily_send_quota",
        "tokens_valid_after",
        "mfa_secret",
        "mfa_pending_secret",
        "mfa_last_step",
    }
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not user columns: {sorted(unknown)}")
    names = list(changes)
    assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
    row = await conn.fetchrow(
        f"UPDATE users SET {assignments}, updated_at = now() WHERE id = $1 "
        f"RETURNING {_USER_COLUMNS}",
        user_id,
        *(changes[n] for n in names),
    )
    assert row is not None, "update_user on a missing user"
    return row


async def claim_totp_step(conn: Conn, *, user_id: uuid.UUID, step: int) -> bool:
    """Record `step` as used if it is newer than the last one; False means a replay."""
    return bool(
        await conn.fetchval(
            """UPDATE users SET mfa_last_step = $2 WHERE id = $1 AND mfa_last_step < $2
               RETURNING true""",
            user_id,
            step,
        )
    )


async def search_users(
    conn: Conn, *, q: str | None, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[asyncpg.Record]:
    """Users by creation order (keyset), optionally whose email or username starts with `q`."""
    rows = await conn.fetch(
        f"""SELECT {_USER_COLUMNS} FROM users
            WHERE ($1::text IS NULL
                   OR email::text ILIKE $1 || '%' OR username::text ILIKE $1 || '%')
              AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
            ORDER BY created_at, id LIMIT $4""",
        _like_escape(q) if q else None,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return list(rows)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# Recovery codes


async def replace_recovery_codes(conn: Conn, *, user_id: uuid.UUID, hashes: list[bytes]) -> None:
    """Forget the old codes and store the new ones."""
    await conn.execute("DELETE FROM recovery_codes WHERE user_id = $1", user_id)
    await conn.executemany(
        "INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)",
        [(user_id, h) for h in hashes],
    )


async def use_recovery_code(conn: Conn, *, user_id: uuid.UUID, code_hash: bytes) -> bool:
    """Spend a recovery code; False if it is unknown or spent."""
    return bool(
        await conn.fetchval(
            """UPDATE recovery_codes SET used_at = now()
               WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL RETURNING true""",
            user_id,
            code_hash,
        )
    )


async def delete_recovery_codes(conn: Conn, *, user_id: uuid.UUID) -> None:
    """Forget all recovery codes of a user."""
    await conn.execute("DELETE FROM recovery_codes WHERE user_id = $1", user_id)


# Sessions and refresh tokens


async def insert_session(
    conn: Conn,
    *,
    session_id: uuid.UUID,
    user_id: uuid.UUID,
    lifetime: timedelta,
    user_agent: str | None,
    ip: str | None,
) -> None:
    """Open a session."""
    await conn.execute(
        """INSERT INTO sessions (id, user_id, expires_at, user_agent, ip)
           VALUES ($1, $2, now() + $3::interval, $4, $5)""",
        session_id,
        user_id,
        lifetime,
        user_agent,
        ip,
    )


async def insert_refresh_token(conn: Conn, *, session_id: uuid.UUID, token_hash: bytes) -> None:
    """Record a refresh token of a session."""
    await conn.execute(
        "INSERT INTO refresh_tokens (token_hash, session_id) VALUES ($1, $2)",
        token_hash,
        session_id,
    )


async def refresh_token(conn: Conn, *, token_hash: bytes) -> asyncpg.Record | None:
    """A refresh token with its session and user, locked for rotation."""
    return await conn.fetchrow(
        """SELECT r.used_at, s.id AS session_id, s.user_id, s.revoked_at, s.expires_at,
                  s.expires_at < now() AS expired
           FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id
           WHERE r.token_hash = $1 FOR UPDATE OF r, s""",
        token_hash,
    )


async def spend_refresh_token(conn: Conn, *, token_hash: bytes) -> None:
    """Mark a refresh token used (it was rotated)."""
    await conn.execute(
        "UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1", token_hash
    )


async def touch_session(conn: Conn, *, session_id: uuid.UUID) -> None:
    """Note that a session was used."""
    await conn.execute("UPDATE sessions SET last_used_at = now() WHERE id = $1", session_id)


async def revoke_session(conn: Conn, *, session_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Revoke one session of a user; False if there is no such live session."""
    return bool(
        await conn.fetchval(
            """UPDATE sessions SET revoked_at = now()
               WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING true""",
            session_id,
            user_id,
        )
    )


async def revoke_sessions(
    conn: Conn,
    *,
    user_id: uuid.UUID,
    tokens_since: timedelta,
    except_session: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """Revoke every live session of a user (but one); the ids of those that issued an access
    token within `tokens_since` (whose tokens may still be unexpired)."""
    rows = await conn.fetch(
        """WITH revoked AS (
               UPDATE sessions SET revoked_at = now()
               WHERE user_id = $1 AND revoked_at IS NULL AND id IS DISTINCT FROM $2
               RETURNING id, last_used_at)
           SELECT id FROM revoked WHERE last_used_at > now() - $3::interval""",
        user_id,
        except_session,
        tokens_since,
    )
    return [row["id"] for row in rows]


async def live_sessions(conn: Conn, *, user_id: uuid.UUID) -> list[asyncpg.Record]:
    """A user's sessions that are neither revoked nor expired, newest first."""
    return list(
        await conn.fetch(
            """SELECT id, created_at, last_used_at, expires_at, user_agent, ip FROM sessions
               WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()
               ORDER BY created_at DESC""",
            user_id,
        )
    )


# Single-use action tokens


async def insert_action_token(
    conn: Conn,
    *,
    token_hash: bytes,
    user_id: uuid.UUID,
    purpose: str,
    lifetime: timedelta,
    data: dict[str, Any] | None = None,
) -> None:
    """Store a single-use token."""
    await conn.execute(
        """INSERT INTO action_tokens (token_hash, user_id, purpose, data, expires_at)
           VALUES ($1, $2, $3, $4, now() + $5::interval)""",
        token_hash,
        user_id,
        purpose,
        data or {},
        lifetime,
    )


async def spend_action_token(
    conn: Conn, *, token_hash: bytes, purpose: str
) -> asyncpg.Record | None:
    """Use a token once: its user and data if it is genuine, unspent and unexpired."""
    return await conn.fetchrow(
        """UPDATE action_tokens SET used_at = now()
           WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
           RETURNING user_id, data""",
        token_hash,
        purpose,
    )


async def expire_action_tokens(conn: Conn, *, user_id: uuid.UUID, purpose: str) -> None:
    """Void a user's outstanding tokens of one purpose (a newer one replaces them)."""
    await conn.execute(
        """UPDATE action_tokens SET used_at = now()
           WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL""",
        user_id,
        purpose,
    )


# API keys


async def insert_api_key(
    conn: Conn,
    *,
    key_id: uuid.UUID,
    user_id: uuid.UUID,
    name: str,
    scope: str,
    prefix: str,
    key_hash: bytes,
) -> asyncpg.Record:
    """Store a new API key (its hash only)."""
    row = await conn.fetchrow(
        """INSERT INTO api_keys (id, user_id, name, scope, prefix, key_hash)
           VALUES ($1, $2, $3, $4, $5, $6)
           RETURNING id, name, scope, prefix, created_at, last_used_at""",
        key_id,
        user_id,
        name,
        scope,
        prefix,
        key_hash,
    )
    assert row is not None
    return row


async def api_keys(conn: Conn, *, user_id: uuid.UUID) -> list[asyncpg.Record]:
    """A user's live API keys."""
    return list(
        await conn.fetch(
            """SELECT id, name, scope, prefix, created_at, last_used_at FROM api_keys
               WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at""",
            user_id,
        )
    )


async def revoke_api_key(conn: Conn, *, key_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Revoke a user's key; False if there is no such live key."""
    return bool(
        await conn.fetchval(
            """UPDATE api_keys SET revoked_at = now()
               WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING true""",
            key_id,
            user_id,
        )
    )


async def api_key_owner(conn: Conn, *, key_hash: bytes) -> asyncpg.Record | None:
    """The live key with this hash, with its owner's role and status; notes its use."""
    return await conn.fetchrow(
        """UPDATE api_keys k SET last_used_at = now()
           FROM users u
           WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND u.id = k.user_id
           RETURNING k.id, k.scope, k.user_id, u.role, u.status""",
        key_hash,
    )


# Throttling


async def throttle_state(conn: Conn, *, keys: list[str]) -> datetime | None:
    """The latest instant until which any of `keys` is locked (None: not locked)."""
    value: datetime | None = await conn.fetchval(
        "SELECT max(locked_until) FROM throttles WHERE key = ANY($1) AND locked_until > now()",
        keys,
    )
    return value


async def record_failure(conn: Conn, *, key: str, window: timedelta) -> int:
    """Count a failure for `key` (a fresh window if the last one is over); returns the count."""
    count: int = await conn.fetchval(
        """INSERT INTO throttles AS t (key, failures, window_start) VALUES ($1, 1, now())
           ON CONFLICT (key) DO UPDATE SET
               failures = CASE WHEN t.window_start < now() - $2::interval THEN 1
                               ELSE t.failures + 1 END,
               window_start = CASE WHEN t.window_start < now() - $2::interval THEN now()
                                   ELSE t.window_start END
           RETURNING failures""",
        key,
        window,
    )
    return count


async def lock(conn: Conn, *, key: str, duration: timedelta) -> None:
    """Lock `key` for `duration`."""
    await conn.execute(
        "UPDATE throttles SET locked_until = now() + $2::interval WHERE key = $1", key, duration
    )


async def clear_throttle(conn: Conn, *, keys: list[str]) -> None:
    """Forget failures (after a success, or a password reset)."""
    await conn.execute("DELETE FROM throttles WHERE key = ANY($1)", keys)


async def count_recent(conn: Conn, *, key: str, window: timedelta) -> int:
    """Count one more use of a rate-limited action; returns uses in the current window."""
    return await record_failure(conn, key=key, window=window)


# Audit


async def audit(
    conn: Conn,
    *,
    actor_id: uuid.UUID | None,
    action: str,
    target_id: uuid.UUID | None,
    details: dict[str, Any] | None = None,
    ip: str | None = None,
) -> None:
    """Record who did what to whom."""
    await conn.execute(
        """INSERT INTO audit_log (actor_id, action, target_id, details, ip)
           VALUES ($1, $2, $3, $4, $5)""",
        actor_id,
        action,
        target_id,
        details or {},
        ip,
    )


async def audit_entries(
    conn: Conn, *, target_id: uuid.UUID | None, before: int | None, limit: int
) -> list[asyncpg.Record]:
    """Newest audit entries first (keyset on id)."""
    return list(
        await conn.fetch(
            """SELECT a.id, a.at, a.actor_id, actor.email AS actor_email, a.action, a.target_id,
                      target.email AS target_email, a.details, a.ip
               FROM audit_log a
               LEFT JOIN users actor ON actor.id = a.actor_id
               LEFT JOIN users target ON target.id = a.target_id
               WHERE ($1::uuid IS NULL OR a.target_id = $1) AND ($2::bigint IS NULL OR a.id < $2)
               ORDER BY a.id DESC LIMIT $3""",
            target_id,
            before,
            limit,
        )
    )
