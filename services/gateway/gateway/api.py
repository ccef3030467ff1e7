"""Public routes of the gateway: everything not its own is forwarded to the owning service."""

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.proxy import forward
from gateway.routes import service_for
from gateway.upstreams import Upstreams
from herald.errors import ApiError

router = APIRouter()

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _upstreams(request: Request) -> Upstreams:
    upstreams = request.app.state.runtime.extras["upstreams"]
    assert isinstance(upstreams, Upstreams)
    return upstreams


@router.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
async def proxy(request: Request, path: str) -> Response:
    """Forward to the service that owns the path."""
    service = service_for("/" + path)
    if service is None:
        raise ApiError(404, "not_found", "no such endpoint")
    api_keys = request.app.state.runtime.extras["api_keys"]
    return await forward(request, _upstreams(request), service, api_keys)
