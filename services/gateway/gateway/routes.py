"""Which service answers which public path, and what the gateway asks of requests to it.

`/internal/...` paths are never routed. Longest prefix wins; a prefix matches the path itself and
anything below it.
"""

from __future__ import annotations

from collections.abc import Iterable

ROUTES: dict[str, str] = {
    "/.well-known/jwks.json": "auth",
    "/signup": "auth",
    "/login": "auth",
    "/token": "auth",
    "/logout": "auth",
    "/sessions": "auth",
    "/mfa": "auth",
    "/profile": "auth",
    "/password": "auth",
    "/api-keys": "auth",
    "/admin/users": "auth",
    "/admin/audit": "auth",
    "/contacts": "contacts",
    "/lists": "contacts",
    "/unsubscribe": "contacts",
    "/compose": "campaign",
    "/send": "campaign",
    "/schedule": "campaign",
    "/emails": "campaign",
    "/tracking": "tracking",
    "/reports": "tracking",
    "/t": "tracking",
    "/webhooks": "tracking",
}

# Reached without a token: they start a session, or a mail, a browser or a provider calls them.
PUBLIC: tuple[str, ...] = (
    "/.well-known/jwks.json",
    "/signup",
    "/login",
    "/token/refresh",
    "/password",
    "/unsubscribe",
    "/t",
    "/webhooks",
)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"

# Media types a request body may have, where it is not JSON. `None`: whatever the sender uses
# (providers' webhooks: SNS posts JSON as text/plain).
BODY_TYPES: dict[str, frozenset[str] | None] = {
    "/contacts/import": frozenset({MULTIPART}),
    # RFC 8058 one-click unsubscribe posts a form; the confirmation page posts one too.
    "/unsubscribe": frozenset({FORM, MULTIPART}),
    # The mailed reset page posts a form; API clients post JSON.
    "/password/reset": frozenset({JSON, FORM}),
    "/webhooks": None,
}

# Paths whose bodies may be as large as an upload rather than a JSON document.
UPLOADS: tuple[str, ...] = ("/contacts/import",)

# GET answers kept for a few seconds, per caller: (prefix, shared by all callers).
CACHED: dict[str, bool] = {"/.well-known/jwks.json": True, "/reports": False}


def _longest(path: str, prefixes: Iterable[str]) -> str | None:
    best: str | None = None
    for prefix in prefixes:
        if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > len(best or ""):
            best = prefix
    return best


def service_for(path: str) -> str | None:
    """The service that owns `path`, or None if no public route leads there."""
    if path.startswith("/internal") or "/internal/" in path:
        return None
    # Dot segments could be resolved on the way and land somewhere no route leads.
    if any(segment in (".", "..") for segment in path.split("/")):
        return None
    prefix = _longest(path, ROUTES)
    return ROUTES[prefix] if prefix is not None else None


def is_public(path: str) -> bool:
    """Whether `path` is reached without authentication."""
    return _longest(path, PUBLIC) is not None


def body_types(path: str) -> frozenset[str] | None:
    """The media types a request body to `path` may have; None: any."""
    prefix = _longest(path, BODY_TYPES)
    return BODY_TYPES[prefix] if prefix is not None else frozenset({JSON})


def is_upload(path: str) -> bool:
    """Whether `path` takes upload-sized bodies."""
    return _longest(path, UPLOADS) is not None


def cache_scope(path: str) -> bool | None:
    """None: not cached; True: one answer for every caller; False: one per account."""
    prefix = _longest(path, CACHED)
    return CACHED[prefix] if prefix is not None else None
