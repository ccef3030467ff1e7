"""What the auth service does, one function per use case; routes call these."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pyotp

from auth import domain, mail, passwords, store
from auth.config import Settings
from auth.tokens import SigningKey, issue_access_token
from herald import outbox
from herald.db import Conn
from herald.errors import ApiError, not_found
from herald.events import Envelope
from herald.events.auth import SessionsRevoked, UserChanged
from herald.security import Principal

log = logging.getLogger(__name__)

VERIFY_EMAIL_LIFETIME = timedelta(hours=24)
RESET_LIFETIME = timedelta(minutes=30)
MFA_STEP_LIFETIME = timedelta(minutes=5)
MAILS_PER_HOUR = 3


@dataclass(frozen=True)
class Client:
    """Where a request came from, for throttling and the audit trail."""

    ip: str
    user_agent: str | None


@dataclass(frozen=True)
class Auth:
    """What the use cases need: the database, settings and the token signing key."""

    pool: asyncpg.Pool
    settings: Settings
    key: SigningKey


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int


@dataclass(frozen=True)
class MfaChallenge:
    mfa_token: str


def _problem(
    field: str, message: str, status: int = 422, code: str = "validation_error"
) -> ApiError:
    return ApiError(status, code, message, field=field)


_INVALID_CREDENTIALS = ApiError(401, "invalid_credentials", "wrong email or password")


def user_changed(user: asyncpg.Record) -> UserChanged:
    """The user's current state as the platform sees it: what `user.changed` carries and what
    `/internal/users/{id}` answers (one builder, so the two cannot drift)."""
    return UserChanged(
        user_id=user["id"],
        email=user["email"],
        email_verified=user["email_verified"],
        username=user["username"],
        display_name=user["display_name"],
        default_sender_name=user["default_sender_name"],
        reply_to=user["reply_to"],
        timezone=user["timezone"],
        status=user["status"],
        role=user["role"],
        daily_send_quota=user["daily_send_quota"],
        tokens_valid_after=user["tokens_valid_after"] or None,
    )


async def publish_user(conn: Conn, user: asyncpg.Record) -> None:
    """Tell the platform the user's current state (in the same transaction as the change)."""
    await outbox.write(conn, Envelope.wrap(user_changed(user), account_id=user["id"]))


def _token_lifetime(auth: Auth) -> timedelta:
    return timedelta(seconds=auth.settings.access_token_ttl_seconds)


async def publish_revoked_sessions(
    conn: Conn, auth: Auth, *, user_id: uuid.UUID, session_ids: list[uuid.UUID]
) -> None:
    """Have every token verifier refuse these sessions' access tokens now, not at their expiry
    (in the same transaction as the revocation)."""
    if not session_ids:
        return
    revoked = SessionsRevoked(
        user_id=user_id,
        session_ids=session_ids,
        # Every access token of these sessions was issued before now.
        tokens_expire_at=time.time() + auth.settings.access_token_ttl_seconds,
    )
    await outbox.write(conn, Envelope.wrap(revoked, account_id=user_id))


# Sign-up and email confirmation


async def signup(
    auth: Auth, *, username: str, email: str, password: str, client: Client
) -> asyncpg.Record:
    """Create an unverified user and mail them a confirmation link."""
    if problem := domain.username_problem(username):
        raise _problem("username", problem)
    if problem := domain.password_problem(password, username=username, email=email):
        raise _problem("password", problem)
    password_hash = await passwords.hash_password(password)
    async with auth.pool.acquire() as conn, conn.transaction():
        name_taken, email_taken = await store.taken(conn, username=username, email=email)
        if email_taken:
            raise _problem("email", "an account with this email already exists", 409, "conflict")
        if name_taken:
            raise _problem("username", "this username is taken", 409, "conflict")
        user = await store.insert_user(
            conn, user_id=uuid.uuid4(), username=username, email=email, password_hash=password_hash
        )
        if user is None:  # lost a race with a concurrent sign-up
            raise _problem(
                "email", "an account with this email or username exists", 409, "conflict"
            )
        await _mail_confirmation(conn, auth, user_id=user["id"], to=email)
        await publish_user(conn, user)
        await store.audit(
            conn, actor_id=user["id"], action="signup", target_id=user["id"], ip=client.ip
        )
        return user


async def _mail_confirmation(
    conn: Conn, auth: Auth, *, user_id: uuid.UUID, to: str, new_email: bool = False
) -> None:
    token = domain.new_secret_token()
    await store.expire_action_tokens(conn, user_id=user_id, purpose="verify_email")
    await store.insert_action_token(
        conn,
        token_hash=domain.token_hash(token),
        user_id=user_id,
        purpose="verify_email",
        lifetime=VERIFY_EMAIL_LIFETIME,
        data={"email": to} if new_email else {},
    )
    await mail.send_confirmation(conn, auth.settings, user_id=user_id, to=to, token=token)


async def confirm_email(auth: Auth, *, token: str) -> asyncpg.Record:
    """Verify the address a confirmation link was sent to (a new one replaces the old)."""
    async with auth.pool.acquire() as conn, conn.transaction():
        spent = await store.spend_action_token(
            conn, token_hash=domain.token_hash(token), purpose="verify_email"
        )
        if spent is None:
            raise ApiError(404, "invalid_token", "this link is invalid, used or expired")
        new_email = spent["data"].get("email")
        if new_email:
            if await store.user_by_email(conn, email=new_email):
                raise _problem(
                    "email", "an account with this email already exists", 409, "conflict"
                )
            user = await store.update_user(
                conn,
                user_id=spent["user_id"],
                email=new_email,
                pending_email=None,
                email_verified=True,
            )
        else:
            user = await store.update_user(conn, user_id=spent["user_id"], email_verified=True)
        await publish_user(conn, user)
        await store.audit(conn, actor_id=user["id"], action="email_verified", target_id=user["id"])
        return user


async def _rate_limited(conn: Conn, *, key: str, limit: int, window: timedelta) -> bool:
    return await store.count_recent(conn, key=key, window=window) > limit


async def resend_confirmation(auth: Auth, *, email: str, client: Client) -> None:
    """Mail a new confirmation link if the address has an unverified account (never says)."""
    async with auth.pool.acquire() as conn, conn.transaction():
        await _limit_client(conn, client, action="mail")
        if await _rate_limited(
            conn, key=f"mail:{email}", limit=MAILS_PER_HOUR, window=timedelta(hours=1)
        ):
            return
        user = await store.user_by_email(conn, email=email)
        if user is not None and not user["email_verified"]:
            await _mail_confirmation(conn, auth, user_id=user["id"], to=user["email"])


async def _limit_client(conn: Conn, client: Client, *, action: str, limit: int = 20) -> None:
    if await _rate_limited(
        conn, key=f"{action}-ip:{client.ip}", limit=limit, window=timedelta(hours=1)
    ):
        raise ApiError(
            429,
            "rate_limited",
            "too many requests; try again later",
            headers={"Retry-After": "3600"},
        )


# Login


def _retry_after(until: datetime) -> ApiError:
    seconds = max(1, int((until - datetime.now(UTC)).total_seconds()) + 1)
    return ApiError(
        429,
        "too_many_attempts",
        f"too many failed attempts; retry in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _throttle_keys(email: str, client: Client) -> tuple[str, str]:
    return f"login:{email}", f"login-ip:{client.ip}"


async def _check_throttle(conn: Conn, email: str, client: Client) -> None:
    locked_until = await store.throttle_state(conn, keys=list(_throttle_keys(email, client)))
    if locked_until is not None:
        raise _retry_after(locked_until)


async def _count_failure(auth: Auth, email: str, client: Client) -> None:
    account_key, address_key = _throttle_keys(email, client)
    async with auth.pool.acquire() as conn, conn.transaction():
        for key, threshold in (
            (account_key, domain.FAILURES_BEFORE_LOCK),
            (address_key, domain.ADDRESS_FAILURES_BEFORE_LOCK),
        ):
            failures = await store.record_failure(conn, key=key, window=domain.FAILURE_WINDOW)
            duration = domain.lock_duration(failures, threshold)
            if duration is not None:
                await store.lock(conn, key=key, duration=duration)


async def login(auth: Auth, *, email: str, password: str, client: Client) -> Tokens | MfaChallenge:
    """Check credentials; tokens, or an MFA challenge when the user has TOTP on."""
    async with auth.pool.acquire() as conn:
        await _check_throttle(conn, email, client)
        user = await store.user_by_email(conn, email=email)
    # Unknown addresses cost one argon2 verification too: timing does not reveal accounts.
    if not await passwords.verify_password(user["password_hash"] if user else None, password):
        await _count_failure(auth, email, client)
        raise _INVALID_CREDENTIALS
    assert user is not None
    async with auth.pool.acquire() as conn, conn.transaction():
        await store.clear_throttle(conn, keys=[_throttle_keys(email, client)[0]])
        if user["status"] != "active":
            raise ApiError(403, "account_disabled", "this account is disabled")
        if not user["email_verified"]:
            raise ApiError(403, "email_not_verified", "confirm your email address first")
        if passwords.needs_rehash(user["password_hash"]):
            await store.update_user(
                conn, user_id=user["id"], password_hash=await passwords.hash_password(password)
            )
        if user["mfa_secret"]:
            token = domain.new_secret_token()
            await store.insert_action_token(
                conn,
                token_hash=domain.token_hash(token),
                user_id=user["id"],
                purpose="mfa_login",
                lifetime=MFA_STEP_LIFETIME,
            )
            return MfaChallenge(mfa_token=token)
        return await _open_session(conn, auth, user, client)


async def _open_session(conn: Conn, auth: Auth, user: asyncpg.Record, client: Client) -> Tokens:
    session_id = uuid.uuid4()
    await store.insert_session(
        conn,
        session_id=session_id,
        user_id=user["id"],
        lifetime=timedelta(days=auth.settings.session_lifetime_days),
        user_agent=(client.user_agent or "")[:300] or None,
        ip=client.ip,
    )
    await store.audit(conn, actor_id=user["id"], action="login", target_id=user["id"], ip=client.ip)
    return await _tokens(conn, auth, user, session_id)


async def _tokens(conn: Conn, auth: Auth, user: asyncpg.Record, session_id: uuid.UUID) -> Tokens:
    refresh = domain.new_secret_token()
    await store.insert_refresh_token(
        conn, session_id=session_id, token_hash=domain.token_hash(refresh)
    )
    access = issue_access_token(
        auth.key,
        user_id=user["id"],
        role=user["role"],
        session_id=session_id,
        issuer=auth.settings.jwt_issuer,
        audience=auth.settings.jwt_audience,
        ttl_seconds=auth.settings.access_token_ttl_seconds,
    )
    return Tokens(access_token=access.token, refresh_token=refresh, expires_in=access.expires_in)


def _totp_step(secret: str, code: str) -> int | None:
    """The time step whose TOTP code is `code` (allowing one step of clock drift), or None."""
    totp = pyotp.TOTP(secret)
    now = time.time()
    for drift in (0, -1, 1):
        at = now + drift * totp.interval
        if domain.constant_time_equal(totp.at(at).encode(), code.encode()):
            return int(totp.timecode(datetime.fromtimestamp(at, UTC)))
    return None


async def _second_factor_ok(conn: Conn, user: asyncpg.Record, code: str, *, secret: str) -> bool:
    """A TOTP code not used before, or an unspent recovery code (spent now)."""
    compact = code.replace(" ", "")
    if compact.isdigit() and len(compact) == 6:
        step = _totp_step(secret, compact)
        return step is not None and await store.claim_totp_step(conn, user_id=user["id"], step=step)
    recovery = domain.normalise_recovery_code(code)
    return await store.use_recovery_code(
        conn, user_id=user["id"], code_hash=domain.token_hash(recovery)
    )


async def login_mfa(auth: Auth, *, mfa_token: str, code: str, client: Client) -> Tokens:
    """Finish a login with a TOTP code (each accepted once) or a recovery code."""
    async with auth.pool.acquire() as conn:
        async with conn.transaction():
            spent = await store.spend_action_token(
                conn, token_hash=domain.token_hash(mfa_token), purpose="mfa_login"
            )
            if spent is None:
                raise ApiError(401, "invalid_mfa_token", "the login step expired; log in again")
            user = await store.user_by_id(conn, user_id=spent["user_id"], lock=True)
            assert user is not None
            await _check_throttle(conn, user["email"], client)
            if user["mfa_secret"] and await _second_factor_ok(
                conn, user, code, secret=user["mfa_secret"]
            ):
                return await _open_session(conn, auth, user, client)
        # A wrong code spends the step: guessing needs the password again, which is throttled.
        await _count_failure(auth, user["email"], client)
        raise ApiError(401, "invalid_code", "wrong or already used code")


async def refresh(auth: Auth, *, refresh_token: str) -> Tokens:
    """Rotate a refresh token; presenting a spent one revokes its whole session."""
    async with auth.pool.acquire() as conn:
        async with conn.transaction():
            row = await store.refresh_token(conn, token_hash=domain.token_hash(refresh_token))
            if row is None or row["revoked_at"] is not None or row["expired"]:
                raise ApiError(401, "invalid_refresh_token", "invalid or expired refresh token")
            if row["used_at"] is None:
                user = await store.user_by_id(conn, user_id=row["user_id"])
                if user is None or user["status"] != "active":
                    raise ApiError(401, "invalid_refresh_token", "invalid or expired refresh token")
                await store.spend_refresh_token(conn, token_hash=domain.token_hash(refresh_token))
                await store.touch_session(conn, session_id=row["session_id"])
                return await _tokens(conn, auth, user, row["session_id"])
        # Reuse: someone holds a copy of a rotated token. End the session for everyone.
        async with conn.transaction():
            if await store.revoke_session(
                conn, session_id=row["session_id"], user_id=row["user_id"]
            ):
                await publish_revoked_sessions(
                    conn, auth, user_id=row["user_id"], session_ids=[row["session_id"]]
                )
            await store.audit(
                conn,
                actor_id=None,
                action="refresh_token_reused",
                target_id=row["user_id"],
                details={"session_id": str(row["session_id"])},
            )
        raise ApiError(401, "refresh_token_reused", "this refresh token was already used")


async def logout(auth: Auth, *, principal: Principal) -> None:
    """End the session of the calling token."""
    if principal.session_id is None:
        raise ApiError(400, "no_session", "this token does not belong to a login session")
    await _end_session(auth, user_id=principal.user_id, session_id=principal.session_id)


async def sessions(auth: Auth, *, principal: Principal) -> list[dict[str, Any]]:
    """The caller's live sessions."""
    async with auth.pool.acquire() as conn:
        rows = await store.live_sessions(conn, user_id=principal.user_id)
    return [dict(r) | {"current": r["id"] == principal.session_id} for r in rows]


async def end_session(auth: Auth, *, principal: Principal, session_id: uuid.UUID) -> None:
    """Revoke one of the caller's sessions."""
    if not await _end_session(auth, user_id=principal.user_id, session_id=session_id):
        raise not_found("session")


async def _end_session(auth: Auth, *, user_id: uuid.UUID, session_id: uuid.UUID) -> bool:
    async with auth.pool.acquire() as conn, conn.transaction():
        if not await store.revoke_session(conn, session_id=session_id, user_id=user_id):
            return False
        await publish_revoked_sessions(conn, auth, user_id=user_id, session_ids=[session_id])
        return True


# MFA management


async def _user(conn: Conn, user_id: uuid.UUID, *, lock: bool = False) -> asyncpg.Record:
    user = await store.user_by_id(conn, user_id=user_id, lock=lock)
    if user is None:
        raise not_found("user")
    return user


async def totp_setup(auth: Auth, *, principal: Principal) -> tuple[str, str]:
    """A new TOTP secret awaiting confirmation by a first code: (secret, otpauth URI)."""
    async with auth.pool.acquire() as conn, conn.transaction():
        user = await _user(conn, principal.user_id, lock=True)
        if user["mfa_secret"]:
            raise ApiError(409, "mfa_already_enabled", "two-factor authentication is already on")
        secret = domain.b32_secret()
        await store.update_user(conn, user_id=user["id"], mfa_pending_secret=secret)
    uri = pyotp.TOTP(secret).provisioning_uri(name=user["email"], issuer_name="Herald")
    return secret, uri


async def totp_enable(auth: Auth, *, principal: Principal, code: str) -> list[str]:
    """Turn TOTP on after a correct first code; returns recovery codes (shown once)."""
    async with auth.pool.acquire() as conn, conn.transaction():
        user = await _user(conn, principal.user_id, lock=True)
        if user["mfa_secret"]:
            raise ApiError(409, "mfa_already_enabled", "two-factor authentication is already on")
        pending = user["mfa_pending_secret"]
        if not pending:
            raise ApiError(409, "mfa_not_set_up", "call /mfa/totp/setup first")
        step = _totp_step(pending, code.strip())
        if step is None or not await store.claim_totp_step(conn, user_id=user["id"], step=step):
            raise _problem("code", "wrong code")
        codes = domain.new_recovery_codes()
        await store.update_user(
            conn, user_id=user["id"], mfa_secret=pending, mfa_pending_secret=None
        )
        await store.replace_recovery_codes(
            conn, user_id=user["id"], hashes=[domain.token_hash(c) for c in codes]
        )
        await store.audit(conn, actor_id=user["id"], action="mfa_enabled", target_id=user["id"])
        return codes


async def totp_disable(auth: Auth, *, principal: Principal, password: str, code: str) -> None:
    """Turn TOTP off, given the password and a current code."""
    async with auth.pool.acquire() as conn:
        user = await _user(conn, principal.user_id)
    if not user["mfa_secret"]:
        raise ApiError(409, "mfa_not_enabled", "two-factor authentication is off")
    if not await passwords.verify_password(user["password_hash"], password):
        raise _problem("password", "wrong password", 401, "invalid_credentials")
    async with auth.pool.acquire() as conn, conn.transaction():
        if not await _second_factor_ok(conn, user, code, secret=user["mfa_secret"]):
            raise _problem("code", "wrong or already used code", 401, "invalid_code")
        await store.update_user(conn, user_id=user["id"], mfa_secret=None, mfa_pending_secret=None)
        await store.delete_recovery_codes(conn, user_id=user["id"])
        await store.audit(conn, actor_id=user["id"], action="mfa_disabled", target_id=user["id"])


# Profile and passwords


async def profile(auth: Auth, *, user_id: uuid.UUID) -> asyncpg.Record:
    """The user's profile."""
    async with auth.pool.acquire() as conn:
        return await _user(conn, user_id)


async def update_profile(
    auth: Auth, *, principal: Principal, changes: dict[str, Any]
) -> asyncpg.Record:
    """Apply profile changes; a new email is confirmed before it replaces the old one."""
    async with auth.pool.acquire() as conn, conn.transaction():
        user = await _user(conn, principal.user_id, lock=True)
        new_email = changes.pop("email", None)
        username = changes.get("username")
        if username is not None and username != user["username"]:
            if problem := domain.username_problem(username):
                raise _problem("username", problem)
            if (await store.taken(conn, username=username, email=""))[0]:
                raise _problem("username", "this username is taken", 409, "conflict")
        if changes:
            user = await store.update_user(conn, user_id=user["id"], **changes)
        if new_email and new_email != user["email"]:
            if (await store.taken(conn, username="", email=new_email))[1]:
                raise _problem(
                    "email", "an account with this email already exists", 409, "conflict"
                )
            user = await store.update_user(conn, user_id=user["id"], pending_email=new_email)
            await _mail_confirmation(conn, auth, user_id=user["id"], to=new_email, new_email=True)
        await publish_user(conn, user)
        return user


async def change_password(
    auth: Auth, *, principal: Principal, current: str, new: str, client: Client
) -> None:
    """Replace the password and end every other session."""
    async with auth.pool.acquire() as conn:
        user = await _user(conn, principal.user_id)
    if not await passwords.verify_password(user["password_hash"], current):
        await _count_failure(auth, user["email"], client)
        raise _problem("current_password", "wrong password", 401, "invalid_credentials")
    if problem := domain.password_problem(new, username=user["username"], email=user["email"]):
        raise _problem("new_password", problem)
    new_hash = await passwords.hash_password(new)
    async with auth.pool.acquire() as conn, conn.transaction():
        await store.update_user(conn, user_id=user["id"], password_hash=new_hash)
        ended = await store.revoke_sessions(
            conn,
            user_id=user["id"],
            tokens_since=_token_lifetime(auth),
            except_session=principal.session_id,
        )
        await publish_revoked_sessions(conn, auth, user_id=user["id"], session_ids=ended)
        await store.audit(
            conn, actor_id=user["id"], action="password_changed", target_id=user["id"], ip=client.ip
        )


async def _mail_reset(conn: Conn, auth: Auth, user: asyncpg.Record) -> None:
    token = domain.new_secret_token()
    await store.expire_action_tokens(conn, user_id=user["id"], purpose="reset_password")
    await store.insert_action_token(
        conn,
        token_hash=domain.token_hash(token),
        user_id=user["id"],
        purpose="reset_password",
        lifetime=RESET_LIFETIME,
    )
    await mail.send_password_reset(
        conn, auth.settings, user_id=user["id"], to=user["email"], token=token
    )


async def forgot_password(auth: Auth, *, email: str, client: Client) -> None:
    """Mail a reset link if the address has an account (the answer never says)."""
    async with auth.pool.acquire() as conn, conn.transaction():
        await _limit_client(conn, client, action="mail")
        if await _rate_limited(
            conn, key=f"mail:{email}", limit=MAILS_PER_HOUR, window=timedelta(hours=1)
        ):
            return
        user = await store.user_by_email(conn, email=email)
        if user is not None and user["status"] == "active":
            await _mail_reset(conn, auth, user)


async def reset_password(auth: Auth, *, token: str, new_password: str, client: Client) -> None:
    """Set a new password from a reset link: unlocks the account, ends every session."""
    async with auth.pool.acquire() as conn, conn.transaction():
        spent = await store.spend_action_token(
            conn, token_hash=domain.token_hash(token), purpose="reset_password"
        )
        if spent is None:
            raise _problem("token", "this link is invalid, used or expired", 404, "invalid_token")
        user = await _user(conn, spent["user_id"], lock=True)
        if problem := domain.password_problem(
            new_password, username=user["username"], email=user["email"]
        ):
            raise _problem("new_password", problem)
        new_hash = await passwords.hash_password(new_password)
        user = await store.update_user(
            conn,
            user_id=user["id"],
            password_hash=new_hash,
            tokens_valid_after=time.time(),
            # The link proved control of the address.
            email_verified=True,
        )
        await store.revoke_sessions(conn, user_id=user["id"], tokens_since=_token_lifetime(auth))
        await store.clear_throttle(conn, keys=[f"login:{user['email']}"])
        await publish_user(conn, user)
        await store.audit(
            conn,
            actor_id=user["id"],
            action="password_reset",
            target_id=user["id"],
            ip=client.ip,
        )


# API keys


async def create_api_key(
    auth: Auth, *, principal: Principal, name: str, scope: str
) -> tuple[asyncpg.Record, str]:
    """A new key for the caller's account: (its record, the key itself, shown once)."""
    key, prefix = domain.new_api_key()
    async with auth.pool.acquire() as conn, conn.transaction():
        row = await store.insert_api_key(
            conn,
            key_id=uuid.uuid4(),
            user_id=principal.user_id,
            name=name,
            scope=scope,
            prefix=prefix,
            key_hash=domain.token_hash(key),
        )
        await store.audit(
            conn,
            actor_id=principal.user_id,
            action="api_key_created",
            target_id=principal.user_id,
            details={"key_id": str(row["id"]), "scope": scope},
        )
    return row, key


async def list_api_keys(auth: Auth, *, principal: Principal) -> list[asyncpg.Record]:
    """The caller's live keys."""
    async with auth.pool.acquire() as conn:
        return await store.api_keys(conn, user_id=principal.user_id)


async def delete_api_key(auth: Auth, *, principal: Principal, key_id: uuid.UUID) -> None:
    """Revoke one of the caller's keys."""
    async with auth.pool.acquire() as conn, conn.transaction():
        if not await store.revoke_api_key(conn, key_id=key_id, user_id=principal.user_id):
            raise not_found("API key")
        await store.audit(
            conn,
            actor_id=principal.user_id,
            action="api_key_revoked",
            target_id=principal.user_id,
            details={"key_id": str(key_id)},
        )


async def api_key_identity(auth: Auth, *, api_key: str) -> asyncpg.Record:
    """The account a live key of an active user belongs to, or 404."""
    if not domain.looks_like_api_key(api_key):
        raise not_found("API key")
    async with auth.pool.acquire() as conn:
        row = await store.api_key_owner(conn, key_hash=domain.token_hash(api_key))
    if row is None or row["status"] != "active":
        raise not_found("API key")
    return row


async def current_user(auth: Auth, *, user_id: uuid.UUID) -> UserChanged:
    """The user's current state, as `user.changed` last published it (or 404)."""
    async with auth.pool.acquire() as conn:
        user = await store.user_by_id(conn, user_id=user_id)
    if user is None:
        raise not_found("user")
    return user_changed(user)


async def exchange_api_key(auth: Auth, *, api_key: str) -> tuple[str, int, asyncpg.Record]:
    """A short-lived access token standing for an API key (the gateway caches it briefly)."""
    row = await api_key_identity(auth, api_key=api_key)
    issued = issue_access_token(
        auth.key,
        user_id=row["user_id"],
        role=row["role"],
        scope=row["scope"],
        issuer=auth.settings.jwt_issuer,
        audience=auth.settings.jwt_audience,
        ttl_seconds=auth.settings.api_key_token_ttl_seconds,
    )
    return issued.token, issued.expires_in, row


# Administration


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values, default=str)).decode().rstrip("=")


def decode_cursor(cursor: str) -> list[Any]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise _problem("cursor", "invalid cursor") from None
    if not isinstance(value, list):
        raise _problem("cursor", "invalid cursor")
    return value


async def admin_users(
    auth: Auth, *, q: str | None, limit: int, cursor: str | None
) -> tuple[list[asyncpg.Record], str | None]:
    """A page of users for administrators."""
    after = None
    if cursor:
        try:
            created, user_id = decode_cursor(cursor)
            after = (datetime.fromisoformat(created), uuid.UUID(user_id))
        except (ValueError, TypeError):
            raise _problem("cursor", "invalid cursor") from None
    async with auth.pool.acquire() as conn:
        rows = await store.search_users(conn, q=q, limit=limit + 1, after=after)
    page, more = rows[:limit], len(rows) > limit
    next_cursor = (
        encode_cursor([page[-1]["created_at"].isoformat(), str(page[-1]["id"])]) if more else None
    )
    return page, next_cursor


async def admin_update_user(
    auth: Auth, *, admin: Principal, user_id: uuid.UUID, changes: dict[str, Any], client: Client
) -> asyncpg.Record:
    """Disable or enable, change role or quota; disabling ends every session at once."""
    async with auth.pool.acquire() as conn, conn.transaction():
        user = await _user(conn, user_id, lock=True)
        columns: dict[str, Any] = {}
        if "disabled" in changes and changes["disabled"] is not None:
            if user_id == admin.user_id and changes["disabled"]:
                raise _problem("disabled", "you cannot disable yourself", 409, "conflict")
            columns["status"] = "disabled" if changes["disabled"] else "active"
            if changes["disabled"]:
                columns["tokens_valid_after"] = time.time()
        if changes.get("role") is not None:
            if user_id == admin.user_id and changes["role"] != "admin":
                raise _problem("role", "you cannot demote yourself", 409, "conflict")
            columns["role"] = changes["role"]
        if "daily_send_quota" in changes:
            columns["daily_send_quota"] = changes["daily_send_quota"]
        if not columns:
            return user
        updated = await store.update_user(conn, user_id=user_id, **columns)
        if columns.get("status") == "disabled":
            await store.revoke_sessions(conn, user_id=user_id, tokens_since=_token_lifetime(auth))
        await publish_user(conn, updated)
        await store.audit(
            conn,
            actor_id=admin.user_id,
            action="user_updated",
            target_id=user_id,
            details={k: v for k, v in columns.items() if k != "tokens_valid_after"},
            ip=client.ip,
        )
        return updated


async def admin_reset_password(
    auth: Auth, *, admin: Principal, user_id: uuid.UUID, client: Client
) -> None:
    """Mail the user a reset link and end their sessions."""
    async with auth.pool.acquire() as conn, conn.transaction():
        user = await _user(conn, user_id, lock=True)
        await _mail_reset(conn, auth, user)
        await store.revoke_sessions(conn, user_id=user_id, tokens_since=_token_lifetime(auth))
        updated = await store.update_user(conn, user_id=user_id, tokens_valid_after=time.time())
        await publish_user(conn, updated)
        await store.audit(
            conn,
            actor_id=admin.user_id,
            action="password_reset_requested",
            target_id=user_id,
            ip=client.ip,
        )


async def admin_audit(
    auth: Auth, *, target_id: uuid.UUID | None, limit: int, cursor: str | None
) -> tuple[list[asyncpg.Record], str | None]:
    """The audit trail, newest first."""
    before = None
    if cursor:
        (before,) = decode_cursor(cursor)
        if not isinstance(before, int):
            raise _problem("cursor", "invalid cursor")
    async with auth.pool.acquire() as conn:
        rows = await store.audit_entries(conn, target_id=target_id, before=before, limit=limit + 1)
    page = rows[:limit]
    return page, encode_cursor([page[-1]["id"]]) if len(rows) > limit else None


async def bootstrap_admin(auth: Auth) -> None:
    """Create (or promote) the administrator named by ADMIN_EMAIL / ADMIN_PASSWORD."""
    settings = auth.settings
    if not settings.admin_email or settings.admin_password is None:
        return
    from auth.schemas import normalise_email

    email = normalise_email(settings.admin_email)
    password = settings.admin_password.get_secret_value()
    async with auth.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('herald-admin-bootstrap'))")
        user = await store.user_by_email(conn, email=email)
        if user is None:
            username = _free_username(email.partition("@")[0])
            user = await store.insert_user(
                conn,
                user_id=uuid.uuid4(),
                username=username,
                email=email,
                password_hash=await passwords.hash_password(password),
                role="admin",
                email_verified=True,
            )
            if user is None:
                raise RuntimeError("could not create the bootstrap administrator")
            log.info("bootstrap administrator created", extra={"user_id": str(user["id"])})
        elif user["role"] != "admin" or not user["email_verified"]:
            user = await store.update_user(
                conn, user_id=user["id"], role="admin", email_verified=True
            )
        else:
            return
        await publish_user(conn, user)
        await store.audit(conn, actor_id=None, action="admin_bootstrapped", target_id=user["id"])


def _free_username(local: str) -> str:
    cleaned = "".join(c for c in local.lower() if c.isalnum() or c in "._-").strip("._-")
    cleaned = cleaned[:24] if len(cleaned) >= 3 else "admin"
    return f"{cleaned}-{uuid.uuid4().hex[:6]}"
