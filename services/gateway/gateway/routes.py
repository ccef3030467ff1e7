"""Which service answers which public path. `/internal/...` paths are never routed."""

from __future__ import annotations

# Longest prefix wins; a prefix matches the path itself and anything below it.
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

_BY_LENGTH = sorted(ROUTES.items(), key=lambda item: len(item[0]), reverse=True)


def service_for(path: str) -> str | None:
    """The service that owns `path`, or None if no public route leads there."""
    if path.startswith("/internal") or "/internal/" in path:
        return None
    for prefix, service in _BY_LENGTH:
        if path == prefix or path.startswith(prefix + "/"):
            return service
    return None
