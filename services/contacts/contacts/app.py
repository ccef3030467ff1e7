"""Builds the contacts service's app: its routes, event handlers and workers."""

from fastapi import FastAPI

from contacts.api import router
from contacts.config import Settings
from contacts.handlers import HANDLERS
from herald.service import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The contacts service's ASGI app."""
    return create_service_app(
        settings or Settings(),
        title="Herald contacts",
        description="Contacts, lists, custom attributes, suppression and unsubscribe.",
        router=router,
        handlers=HANDLERS,
    )
