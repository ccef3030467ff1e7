"""Password hashing with argon2id at OWASP's recommended cost, off the event loop."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP Password Storage Cheat Sheet: argon2id, m=19 MiB, t=2, p=1.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

# Verified when an address has no account, so a login costs the same either way.
_DUMMY_HASH = HASHER.hash("timing-equaliser-not-a-password")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(HASHER.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches; with no hash, does the same work and answers False."""

    def check() -> bool:
        try:
            return HASHER.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


def needs_rehash(password_hash: str) -> bool:
    return HASHER.check_needs_rehash(password_hash)
