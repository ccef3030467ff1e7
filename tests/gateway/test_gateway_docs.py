"""The API documents and pages: merged OpenAPI, AsyncAPI, Swagger UI and ReDoc served offline."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from typing import Any

import httpx
import jsonschema_rs

from gateway.routes import is_public, service_for
from herald.devinfra.stack import Stack
from herald.events import EVENT_TYPES

_ERROR_REF = "#/components/schemas/ErrorResponse"


def _resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _unresolved(document: dict[str, Any]) -> set[str]:
    missing = set()
    for ref in _refs(document):
        try:
            _resolve(document, ref)
        except KeyError:
            missing.add(ref)
    return missing


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value)
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for item in node:
            found |= _refs(item)
    return found


async def test_openapi_is_one_document_of_the_public_api(gateway: httpx.AsyncClient):
    response = await gateway.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "Herald API"
    paths = document["paths"]
    assert {"/signup", "/login", "/profile", "/api-keys", "/admin/system", "/admin/usage"} <= set(
        paths
    )
    for path in paths:
        assert "internal" not in path, path
        assert service_for(path) is not None or path.startswith("/admin/"), path
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert document["security"] == [{"bearerAuth": []}]
    missing = _unresolved(document)
    assert not missing, f"references to nothing (from a service's own /openapi.json): {missing}"


async def test_every_operation_documents_its_errors_and_auth(gateway: httpx.AsyncClient):
    document = (await gateway.get("/openapi.json")).json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert {"429", "503", "504"} <= set(responses), (method, path)
            if is_public(path):
                assert operation["security"] == [], (method, path)
            else:
                assert operation.get("security", document["security"]), (method, path)
                assert "401" in responses, (method, path)
            if "requestBody" in operation:
                assert {"413", "415"} <= set(responses), (method, path)
            for status, response in responses.items():
                json_body = response.get("content", {}).get("application/json")
                if int(status) >= 400 and json_body is not None:
                    assert json_body["schema"] == {"$ref": _ERROR_REF}, (method, path, status)
                gateway_answers = {"413", "415", "429", "503", "504"}
                if status in gateway_answers | (set() if is_public(path) else {"401"}):
                    assert json_body is not None, (method, path, status)
    assert document["paths"]["/signup"]["post"]["security"] == []
    assert "security" not in document["paths"]["/profile"]["get"]


async def test_openapi_answers_conditional_requests(gateway: httpx.AsyncClient):
    first = await gateway.get("/openapi.json")
    again = await gateway.get("/openapi.json", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304


async def test_asyncapi_documents_every_topic_and_event(gateway: httpx.AsyncClient):
    response = await gateway.get("/asyncapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in document["channels"].values()}
    # The platform's own events: a test may register one of its own in this process.
    platform_events = {
        name: cls for name, cls in EVENT_TYPES.items() if cls.__module__.startswith("herald.")
    }
    assert {cls.TOPIC for cls in platform_events.values()} <= addresses
    assert "email.requests.dlq" in addresses
    names = {m["name"] for m in document["components"]["messages"].values()}
    assert set(platform_events) <= names
    inbound = [o for o in document["operations"].values() if o["action"] == "receive"]
    assert [o["channel"]["$ref"] for o in inbound] == ["#/channels/emailRequests"]
    request_schema = document["components"]["schemas"]["SendRequested"]
    assert {"idempotency_key", "to", "subject"} <= set(request_schema["required"])
    assert not _unresolved(document)


async def test_documentation_pages_are_served_offline_with_a_csp(gateway: httpx.AsyncClient):
    for page in ("/docs", "/redoc"):
        response = await gateway.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-eval" not in csp
        assert "http" not in response.text.replace("http-equiv", ""), "no remote assets"
        assert "<script>" not in response.text, "no inline script"
        for source in re.findall(r"(?:src|href)='([^']+)'", response.text):
            asset = await gateway.get(source)
            assert asset.status_code == 200, source
            assert len(asset.content) > 200, source
    assert (await gateway.get("/docs/assets/../../etc/passwd")).status_code == 404
    assert (await gateway.get("/docs/assets/nothing.js")).status_code == 404


async def test_swagger_ui_renders_in_a_browser_under_its_csp(platform: Stack):
    assert shutil.which("chromium"), "Debian's chromium is required (make test installs it)"
    url = platform.url("gateway") + "/docs"
    with tempfile.TemporaryDirectory() as profile:
        browser = await asyncio.create_subprocess_exec(
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        dom, errors = await asyncio.wait_for(browser.communicate(), 120)
    page = dom.decode()
    # The operations list is drawn only if the bundle ran and fetched /openapi.json under the CSP.
    assert "opblock-tag" in page, errors.decode()[-3000:]
    assert "/signup" in page


async def test_every_json_body_has_an_example_that_fits_its_schema(gateway: httpx.AsyncClient):
    document = (await gateway.get("/openapi.json")).json()
    components = document["components"]
    checked = 0
    misfits: list[str] = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            bodies = [("request", operation.get("requestBody", {}))]
            bodies += [(status, answer) for status, answer in operation["responses"].items()]
            for where, body in bodies:
                media = body.get("content", {}).get("application/json")
                if media is None:
                    continue
                name = f"{method.upper()} {path} {where}"
                assert "example" in media or "examples" in media, f"{name} has no example"
                examples = (
                    [media["example"]]
                    if "example" in media
                    else [e["value"] for e in media["examples"].values() if "value" in e]
                )
                validator = jsonschema_rs.validator_for(
                    media["schema"] | {"components": components}
                )
                for value in examples:
                    checked += 1
                    errors = [e.message for e in validator.iter_errors(value)]
                    if errors:
                        misfits.append(f"{name}: {value!r}: {errors[:2]}")
    assert not misfits, "\n".join(misfits)
    assert checked >= 60
