"""Builds the contacts service's app: its routes, event handlers and workers."""

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from contacts.api import router
from contacts.config import Settings
from contacts.handlers import HANDLERS
from contacts.imports import importer_worker
from herald.links import LinkSigner
from herald.service import Runtime, Worker, create_service_app


def _link_signer(settings: Settings) -> Worker:
    """The signer that checks unsubscribe links (the dispatcher signs them with the same keys)."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        runtime.extras["links"] = LinkSigner.from_spec(
            settings.link_signing_keys.get_secret_value()
        )
        yield

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The contacts service's ASGI app."""
    settings = settings or Settings()
    return create_service_app(
        settings,
        title="Herald contacts",
        description="Contacts, lists, custom attributes, suppression and unsubscribe.",
        router=router,
        handlers=HANDLERS,
        workers=(_link_signer(settings), importer_worker(settings)),
    )
