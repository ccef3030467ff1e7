"""Builds the auth service's app: its routes, event handlers and workers."""

from fastapi import FastAPI

from auth.api import router
from auth.config import Settings
from auth.handlers import HANDLERS
from herald.service import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The auth service's ASGI app."""
    return create_service_app(
        settings or Settings(),
        title="Herald auth",
        description="Identities: sign-up, login, MFA, sessions, API keys and administrators.",
        router=router,
        handlers=HANDLERS,
    )
