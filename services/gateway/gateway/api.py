"""Routes of the gateway: its own (documents, administrators' views), then everything else
forwarded to the owning service."""

from __future__ import annotations

import functools
import json
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from gateway import admin, asyncapi
from gateway.cache import ResponseCache
from gateway.docs import router as docs_router
from gateway.domain import acceptable_body, entity_tag, matches, media_type
from gateway.identity import Caller, administrator, authenticate, extra, limit_account
from gateway.metrics import REJECTED
from gateway.openapi import ApiDocuments
from gateway.proxy import forward
from gateway.routes import body_types, is_public, service_for
from gateway.schemas import SystemView, UsageReport
from gateway.upstreams import Upstreams
from herald.errors import ERROR_RESPONSES, ApiError
from herald.security import internal_headers

router = APIRouter(responses=ERROR_RESPONSES)
router.include_router(docs_router)

Admin = Annotated[Caller, Depends(administrator)]

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_MAX_USAGE_DAYS = 366


def _document(request: Request, body: bytes, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> Response:
    """The OpenAPI 3.1 document of the whole public API."""
    documents = extra(request, "api_documents", ApiDocuments)
    body, etag = await documents.document(request.app.openapi())
    return _document(request, body, etag)


@functools.cache
def _asyncapi(version: str) -> tuple[bytes, str]:
    body = json.dumps(asyncapi.document(version=version)).encode()
    return body, entity_tag(body)


@router.get("/asyncapi.json", include_in_schema=False)
async def asyncapi_document(request: Request) -> Response:
    """The AsyncAPI 3.0 document of the Kafka topics other systems publish and consume."""
    return _document(request, *_asyncapi(request.app.state.runtime.settings.version))


@router.get("/admin/system", response_model=SystemView, tags=["admin"])
async def admin_system(request: Request, _: Admin) -> SystemView:
    """Every service's health and version, consumer lag, outbox backlog, database size, and
    delivery and tracking rates (administrators only)."""
    upstreams = extra(request, "upstreams", Upstreams)
    return await admin.system_view(
        upstreams.client, upstreams.urls, internal_headers(request.app.state.runtime.settings)
    )


@router.get("/admin/usage", response_model=UsageReport, tags=["admin"])
async def admin_usage(
    request: Request,
    _: Admin,
    start: Annotated[
        date | None, Query(alias="from", description="first day (default: 29 days ago)")
    ] = None,
    end: Annotated[date | None, Query(alias="to", description="last day (default: today)")] = None,
) -> UsageReport:
    """Recipients sent per account per day, the top senders, and quota use today
    (administrators only; at most 366 days at once)."""
    end = end or datetime.now(UTC).date()
    start = start or end - timedelta(days=29)
    if start > end:
        raise ApiError(422, "validation_error", "from must not be after to", field="from")
    if (end - start).days >= _MAX_USAGE_DAYS:
        raise ApiError(
            422, "validation_error", f"at most {_MAX_USAGE_DAYS} days at once", field="to"
        )
    upstreams = extra(request, "upstreams", Upstreams)
    return await admin.usage_report(
        upstreams.client,
        upstreams.urls["campaign"],
        internal_headers(request.app.state.runtime.settings),
        start=start,
        end=end,
    )


def _check_body_type(request: Request, path: str) -> None:
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    if not has_body:
        return
    allowed = body_types(path)
    if not acceptable_body(media_type(request.headers.get("content-type")), allowed):
        REJECTED.labels("unsupported_media_type").inc()
        accepted = ", ".join(sorted(allowed or ()))
        raise ApiError(
            415,
            "unsupported_media_type",
            f"this endpoint takes a body of type {accepted}",
            field="Content-Type",
        )


async def proxy(request: Request) -> Response:
    """Forward to the service that owns the path, once the caller is known where it must be."""
    path = request.url.path
    service = service_for(path)
    if service is None:
        raise ApiError(404, "not_found", "no such endpoint")
    caller = None
    if not is_public(path):
        caller = await authenticate(request)
        limit_account(request, caller.principal)
    _check_body_type(request, path)
    return await forward(
        request,
        extra(request, "upstreams", Upstreams),
        service,
        caller=caller,
        cache=extra(request, "response_cache", ResponseCache),
    )


# A plain route, not FastAPI's: it takes the request as it is, so FastAPI's parameter and
# dependency machinery (some 8% of the gateway's busy time per forwarded request, profiled)
# has nothing to do.
router.add_route("/{path:path}", proxy, methods=_METHODS, include_in_schema=False)
