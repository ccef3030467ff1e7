"""Access tokens: EdDSA-signed JWTs, and the JWKS that lets every service verify them."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from herald.security import ALGORITHM


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(public: Ed25519PublicKey) -> dict[str, str]:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}


def _thumbprint(jwk: dict[str, str]) -> str:
    # RFC 7638: SHA-256 over the required members, lexically ordered, no whitespace.
    canonical = orjson.dumps({k: jwk[k] for k in ("crv", "kty", "x")}, option=orjson.OPT_SORT_KEYS)
    return _b64(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    """The private key auth signs with, named by its RFC 7638 thumbprint."""

    private: Ed25519PrivateKey
    kid: str

    @classmethod
    def from_pem(cls, pem: str) -> SigningKey:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("JWT_PRIVATE_KEY must be an Ed25519 private key in PEM")
        return cls(private=key, kid=_thumbprint(_public_jwk(key.public_key())))

    def jwk(self) -> dict[str, str]:
        """The public half, as published in the JWKS."""
        return {
            **_public_jwk(self.private.public_key()),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }


@dataclass(frozen=True)
class IssuedToken:
    token: str
    token_id: str
    expires_in: int


def issue_access_token(
    key: SigningKey,
    *,
    user_id: uuid.UUID,
    role: Literal["user", "admin"],
    scope: Literal["full", "send"] = "full",
    session_id: uuid.UUID | None = None,
    issuer: str,
    audience: str,
    ttl_seconds: int,
) -> IssuedToken:
    """A signed access token for `user_id` (whose account is their own)."""
    # `iat` keeps sub-second precision: revocation compares it with the instant of a disable.
    now = time.time()
    token_id = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": str(user_id),
        "acc": str(user_id),
        "role": role,
        "scope": scope,
        "iat": now,
        "nbf": int(now),
        "exp": int(now) + ttl_seconds,
        "jti": token_id,
    }
    if session_id is not None:
        claims["sid"] = str(session_id)
    token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})
    return IssuedToken(token=token, token_id=token_id, expires_in=ttl_seconds)
