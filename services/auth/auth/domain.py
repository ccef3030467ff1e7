"""Pure rules of identities: what a valid username and password are, lockout back-off, secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from zxcvbn import zxcvbn
from zxcvbn.frequency_lists import FREQUENCY_LISTS

USERNAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{1,30})[a-z0-9]$")
PASSWORD_MIN, PASSWORD_MAX = 12, 128
_COMMON_PASSWORDS = frozenset(FREQUENCY_LISTS["passwords"])

# Failed logins a key may have in a window before it is locked, and how the lock grows.
FAILURES_BEFORE_LOCK = 5
FAILURE_WINDOW = timedelta(minutes=15)
FIRST_LOCK = timedelta(seconds=30)
LONGEST_LOCK = timedelta(minutes=15)
# A client address gets more room: many people can share one (offices, carrier NAT).
ADDRESS_FAILURES_BEFORE_LOCK = 30

API_KEY_PREFIX = "hk_"


def username_problem(username: str) -> str | None:
    """Why `username` is not acceptable, or None."""
    if not USERNAME.fullmatch(username):
        return "3 to 32 characters: lower-case letters, digits, '.', '_' or '-', not at the ends"
    return None


def password_problem(password: str, *, username: str = "", email: str = "") -> str | None:
    """Why `password` is not acceptable (NIST SP 800-63B: length and a blocklist), or None."""
    if len(password) < PASSWORD_MIN:
        return f"at least {PASSWORD_MIN} characters"
    if len(password) > PASSWORD_MAX:
        return f"at most {PASSWORD_MAX} characters"
    lowered = password.lower()
    if lowered in _COMMON_PASSWORDS:
        return "this password is too common"
    context = [v for v in (username, email, email.partition("@")[0]) if v]
    if any(len(v) >= 4 and v.lower() in lowered for v in context):
        return "must not contain your username or email address"
    # zxcvbn catches what a list cannot: keyboard walks, repeats, dates, l33t of common words.
    if zxcvbn(password[:64], user_inputs=context)["score"] < 2:
        return "too easy to guess: try a longer phrase of unrelated words"
    return None


def lock_duration(failures: int, threshold: int) -> timedelta | None:
    """How long a key is locked after `failures` failures; doubling from 30 s up to 15 min."""
    if failures < threshold:
        return None
    lock: timedelta = FIRST_LOCK * 2 ** min(failures - threshold, 16)
    return min(lock, LONGEST_LOCK)


def new_secret_token() -> str:
    """A high-entropy URL-safe token for links, refresh tokens and MFA steps."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """What is stored instead of a token: tokens are random, so a plain SHA-256 suffices."""
    return hashlib.sha256(token.encode()).digest()


def new_api_key() -> tuple[str, str]:
    """(the key shown once, its public prefix)."""
    prefix = secrets.token_hex(4)
    return f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}", prefix


def looks_like_api_key(token: str) -> bool:
    return token.startswith(API_KEY_PREFIX)


def new_recovery_codes(count: int = 10) -> list[str]:
    """One-time MFA recovery codes, `xxxxx-xxxxx` in an unambiguous alphabet."""
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(alphabet) for _ in range(10))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    return codes


def normalise_recovery_code(code: str) -> str:
    compact = re.sub(r"[\s-]", "", code.lower())
    return f"{compact[:5]}-{compact[5:]}" if len(compact) == 10 else code.lower()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def b32_secret() -> str:
    """A TOTP secret: 160 random bits in base32, as authenticator apps expect."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
