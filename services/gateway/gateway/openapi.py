"""One OpenAPI 3.1 document for the whole public API, merged from the services' own.

Each service describes its routes at its own `/openapi.json`; the gateway fetches them at start
and every `OPENAPI_REFRESH_SECONDS` (a missing one every second until it answers), keeps only
the paths it routes publicly to that service (never `/internal`), and merges components,
renaming a schema `<Service><Name>` when two services mean different things by one name. It adds
what the gateway itself does to every call: the bearer scheme (access token or API key), public
paths marked `security: []`, and the error answers every call may get (400 for a body that does
not parse, 401, 413, 415, 429, 503, 504) in the one JSON error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from pydantic.json_schema import models_json_schema

from gateway.domain import entity_tag
from gateway.examples import add_examples
from gateway.routes import is_public, service_for
from herald.errors import ErrorResponse

log = logging.getLogger(__name__)

Document = dict[str, Any]

_REF_PREFIX = "#/components/"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_RATE_HEADERS = {
    "Retry-After": "Seconds to wait before trying again.",
    "RateLimit-Limit": "Requests the bucket holds (its burst).",
    "RateLimit-Remaining": "Requests left in the bucket now.",
    "RateLimit-Reset": "Seconds until the bucket is full again.",
}
SECURITY_SCHEME = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT access token from POST /login, or an API key (hk_…)",
        "description": (
            "An access token from `POST /login` (valid 10 minutes; renew it with "
            "`POST /token/refresh`), or an API key from `POST /api-keys`, both as "
            "`Authorization: Bearer <token>`."
        ),
    }
}
DESCRIPTION = """The public API of Herald, an open-source email-sending platform.

Every error answers `{"error": {"code", "message", "details": [{"field", "message"}]}}`.
Authenticate with `Authorization: Bearer <token>`: an access token from `POST /login`, or an
API key (`hk_…`) from `POST /api-keys`. Paths marked without security are public.

Rate limits are token buckets per client address and per account; every answer carries
`RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (IETF httpapi draft) for the
limit nearest to being exhausted, and a `429` adds `Retry-After`. `GET /reports` answers are
kept for a few seconds per account and carry an `ETag`: send `If-None-Match` to get `304`.
The Kafka interface is described at `/asyncapi.json`."""


def _error_schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(ErrorResponse, "serialization")], ref_template=_REF_PREFIX + "schemas/{model}"
    )
    return dict(top.get("$defs", {}))


def _rewrite_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value in renames:
                out[key] = renames[value]
            else:
                out[key] = _rewrite_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, renames) for item in node]
    return node


def _fresh_name(service: str, name: str, taken: Iterable[str]) -> str:
    base = f"{service.capitalize()}{name}"
    candidate, n = base, 2
    taken = set(taken)
    while candidate in taken:
        candidate, n = f"{base}{n}", n + 1
    return candidate


def _merge_components(merged: Document, service: str, document: Document) -> Document:
    """Add `document`'s components to `merged`; returns `document` with refs to renamed ones."""
    components: dict[str, dict[str, Any]] = document.get("components", {})
    target: dict[str, dict[str, Any]] = merged.setdefault("components", {})
    renames: dict[str, str] = {}
    # Renaming one component can change another that refers to it: repeat until stable.
    while True:
        rewritten = _rewrite_refs(components, renames)
        found = False
        for kind, entries in rewritten.items():
            if kind == "securitySchemes":
                continue
            existing = target.get(kind, {})
            for name, value in entries.items():
                ref = f"{_REF_PREFIX}{kind}/{name}"
                if ref in renames or name not in existing or existing[name] == value:
                    continue
                taken = set(existing) | set(entries) | {r.rsplit("/", 1)[1] for r in renames}
                renames[ref] = f"{_REF_PREFIX}{kind}/{_fresh_name(service, name, taken)}"
                found = True
        if not found:
            break
    for kind, entries in rewritten.items():
        if kind == "securitySchemes":
            continue
        bucket = target.setdefault(kind, {})
        for name, value in entries.items():
            final = renames.get(f"{_REF_PREFIX}{kind}/{name}", f"{_REF_PREFIX}{kind}/{name}")
            bucket.setdefault(final.rsplit("/", 1)[1], value)
    return dict(_rewrite_refs({k: v for k, v in document.items() if k != "components"}, renames))


def _error_response(description: str, headers: Mapping[str, str] | None = None) -> Document:
    response: Document = {
        "description": description,
        "content": {"application/json": {"schema": dict(_ERROR_REF)}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "integer"}}
            for name, text in headers.items()
        }
    return response


def _gateway_answers(operation: Document, *, public: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for response in responses.values():
        for media in response.get("content", {}).values():
            # FastAPI's default validation error shape is not ours: every service answers 422
            # in the one error shape.
            if media.get("schema") == {"$ref": "#/components/schemas/HTTPValidationError"}:
                media["schema"] = dict(_ERROR_REF)
    added = {
        "429": _error_response("too many requests (rate limited)", _RATE_HEADERS),
        "503": _error_response("the service behind this path is unavailable"),
        "504": _error_response("the service behind this path did not answer in time"),
    }
    if not public:
        added["401"] = _error_response("missing, invalid, expired or revoked token")
    if "requestBody" in operation:
        added["400"] = _error_response("the request body is not well-formed (not JSON, say)")
        added["413"] = _error_response("the request body is too large")
        added["415"] = _error_response("the request body's media type is not accepted here")
    for status, response in added.items():
        declared = responses.setdefault(status, response)
        # A page that answers its own errors in HTML still gets the gateway's in JSON.
        declared.setdefault("content", {}).setdefault(
            "application/json", {"schema": dict(_ERROR_REF)}
        )
    if public:
        operation["security"] = []


def merge(documents: Mapping[str, Document], *, version: str) -> Document:
    """The public API: `documents` (service → its OpenAPI; "gateway" for its own routes)."""
    merged: Document = {
        "openapi": "3.1.0",
        "info": {
            "title": "Herald API",
            "version": version,
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": {},
        "components": {"schemas": _error_schemas(), "securitySchemes": SECURITY_SCHEME},
        "security": [{"bearerAuth": []}],
        "tags": [],
    }
    operation_ids: set[str] = set()
    tag_names: set[str] = set()
    for service, original in documents.items():
        document = _merge_components(merged, service, copy.deepcopy(original))
        for tag in document.get("tags", []):
            if tag.get("name") not in tag_names:
                tag_names.add(tag["name"])
                merged["tags"].append(tag)
        for path, item in document.get("paths", {}).items():
            owner = "gateway" if service_for(path) is None else service_for(path)
            if owner != service or path.startswith("/internal") or path in merged["paths"]:
                continue
            for method in _METHODS:
                operation = item.get(method)
                if operation is None:
                    continue
                op_id = operation.get("operationId")
                if op_id in operation_ids:
                    operation["operationId"] = op_id = f"{service}_{op_id}"
                operation_ids.add(op_id)
                _gateway_answers(operation, public=is_public(path))
                for tag in operation.get("tags", []):
                    if tag not in tag_names:
                        tag_names.add(tag)
                        merged["tags"].append({"name": tag})
            merged["paths"][path] = item
    merged["paths"] = dict(sorted(merged["paths"].items()))
    add_examples(merged)
    _drop_unused_schemas(merged)
    return merged


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value)
            else:
                _refs(value, found)
    elif isinstance(node, list):
        for item in node:
            _refs(item, found)


def _drop_unused_schemas(merged: Document) -> None:
    # Only what the kept paths reach: the schemas of dropped internal routes stay out.
    schemas: dict[str, Any] = merged["components"]["schemas"]
    reached: set[str] = set()
    _refs(merged["paths"], reached)
    frontier = set(reached)
    while frontier:
        found: set[str] = set()
        for ref in frontier:
            name = ref.removeprefix(_REF_PREFIX + "schemas/")
            _refs(schemas.get(name, {}), found)
        frontier = found - reached
        reached |= found
    merged["components"]["schemas"] = {
        name: value
        for name, value in sorted(schemas.items())
        if f"{_REF_PREFIX}schemas/{name}" in reached
    }


class ApiDocuments:
    """The services' OpenAPI documents, refreshed in the background, and their merge, cached."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        urls: Mapping[str, str],
        version: str,
        refresh_seconds: float,
    ) -> None:
        self._client = client
        self._urls = dict(urls)
        self._version = version
        self._refresh_seconds = refresh_seconds
        self._documents: dict[str, Document] = {}
        self._generation = 0
        self._merged: tuple[int, bytes, str] | None = None
        self._lock = asyncio.Lock()
        self._fetching = asyncio.Lock()

    @property
    def missing(self) -> list[str]:
        """Services whose document the gateway has not got yet."""
        return [s for s in self._urls if s not in self._documents]

    async def _fetch(self, service: str) -> None:
        try:
            response = await self._client.get(f"{self._urls[service]}/openapi.json", timeout=2)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.info("no API document yet", extra={"upstream": service, "error": repr(exc)})
            return
        valid = isinstance(document, dict) and isinstance(document.get("paths"), dict)
        if valid and document != self._documents.get(service):
            self._documents[service] = document
            self._generation += 1

    async def refresh(self, services: Iterable[str] | None = None) -> None:
        """Fetch the documents of `services` (default: all) again, keeping the last good one."""
        await asyncio.gather(*(self._fetch(s) for s in (services or list(self._urls))))

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the documents current until `stop` is set."""
        while not stop.is_set():
            await self.refresh(self.missing or None)
            pause = 1.0 if self.missing else self._refresh_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    async def document(self, own: Document) -> tuple[bytes, str]:
        """The merged document (JSON bytes) and its entity tag; `own` is the gateway's routes."""
        if self.missing:
            # A service that came up since the last attempt is in the very next answer; one
            # attempt at a time, however many readers ask.
            async with self._fetching:
                if self.missing:
                    await self.refresh(self.missing)
        async with self._lock:
            if self._merged is None or self._merged[0] != self._generation:
                generation = self._generation
                sources = {"gateway": own} | {
                    s: self._documents[s] for s in self._urls if s in self._documents
                }
                body = json.dumps(merge(sources, version=self._version)).encode()
                self._merged = (generation, body, entity_tag(body))
            return self._merged[1], self._merged[2]
