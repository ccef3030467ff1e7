"""Builds the tracking service's app: its routes, event handlers and workers."""

from fastapi import FastAPI

from herald.service import create_service_app
from tracking.api import router
from tracking.config import Settings
from tracking.handlers import HANDLERS


def create_app(settings: Settings | None = None) -> FastAPI:
    """The tracking service's ASGI app."""
    return create_service_app(
        settings or Settings(),
        title="Herald tracking",
        description="Delivery status, opens, clicks, bounces, complaints and reports.",
        router=router,
        handlers=HANDLERS,
    )
