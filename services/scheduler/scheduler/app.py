"""Builds the scheduler service's app: its routes, event handlers and workers."""

from fastapi import FastAPI

from herald.service import create_service_app
from scheduler.api import router
from scheduler.config import Settings
from scheduler.handlers import HANDLERS


def create_app(settings: Settings | None = None) -> FastAPI:
    """The scheduler service's ASGI app."""
    return create_service_app(
        settings or Settings(),
        title="Herald scheduler",
        description="Durable timers and the fan-out of an email to per-recipient delivery jobs.",
        router=router,
        handlers=HANDLERS,
    )
