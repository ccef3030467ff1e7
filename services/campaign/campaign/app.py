"""Builds the campaign service's app: its routes, event handlers and workers."""

from fastapi import FastAPI

from campaign.api import router
from campaign.config import Settings
from campaign.handlers import HANDLERS
from herald.service import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The campaign service's ASGI app."""
    return create_service_app(
        settings or Settings(),
        title="Herald campaign",
        description="Emails: drafts, content, audience, status; send requests from other systems.",
        router=router,
        handlers=HANDLERS,
    )
