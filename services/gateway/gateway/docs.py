"""Swagger UI at `/docs` and ReDoc at `/redoc`, served offline.

The scripts and styles come from the `fastapi-offline` wheel (pinned with the rest of the
dependencies), not a CDN: the pages work on a machine without internet, and the CSP can say
`script-src 'self'` with no inline script at all (Swagger UI's start-up code is a file too).
"""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from herald.errors import ApiError

ASSETS_PATH = "/docs/assets"
_COMMON_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Swagger UI needs no more than the common policy; ReDoc runs its search index in a worker it
# creates from a blob.
SWAGGER_CSP = _COMMON_CSP
REDOC_CSP = _COMMON_CSP + "; worker-src blob:"

_SWAGGER_INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


def _static_dir() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


def _page(title: str, head: str, body: str, csp: str) -> HTMLResponse:
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
        f"<link rel=icon type=image/png href='{ASSETS_PATH}/favicon.png'>{head}</head>"
        f"<body style='margin:0'>{body}</body></html>"
    )
    return HTMLResponse(
        document, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"}
    )


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    """Swagger UI over the merged API document."""
    return _page(
        "Herald API",
        f"<link rel=stylesheet href='{ASSETS_PATH}/swagger-ui.css'>",
        f"<div id=swagger-ui></div><script src='{ASSETS_PATH}/swagger-ui-bundle.js'></script>"
        f"<script src='{ASSETS_PATH}/swagger-init.js'></script>",
        SWAGGER_CSP,
    )


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    """ReDoc over the merged API document."""
    return _page(
        "Herald API",
        "",
        f"<redoc spec-url='/openapi.json'></redoc>"
        f"<script src='{ASSETS_PATH}/redoc.standalone.js'></script>",
        REDOC_CSP,
    )


@router.get(ASSETS_PATH + "/swagger-init.js")
async def swagger_init() -> Response:
    """Swagger UI's start-up code, as a file so that the page needs no inline script."""
    return Response(
        _SWAGGER_INIT, media_type="text/javascript", headers={"Cache-Control": "no-cache"}
    )


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> FileResponse:
    """A script, style or icon of the documentation pages."""
    media = _ASSETS.get(name)
    if media is None:
        raise ApiError(404, "not_found", "no such asset")
    return FileResponse(
        _static_dir() / name,
        media_type=media,
        headers={"Cache-Control": "public, max-age=86400"},
    )
