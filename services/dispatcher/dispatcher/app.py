"""Builds the dispatcher service's app: its routes, event handlers and workers."""

from fastapi import FastAPI

from dispatcher.api import router
from dispatcher.config import Settings
from dispatcher.handlers import HANDLERS
from herald.service import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The dispatcher service's ASGI app."""
    return create_service_app(
        settings or Settings(),
        title="Herald dispatcher",
        description="Renders, signs and delivers each recipient's message over SMTP.",
        router=router,
        handlers=HANDLERS,
    )
