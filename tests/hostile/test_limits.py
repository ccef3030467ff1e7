"""Malformed and oversized input to every endpoint that takes a body (found in the merged OpenAPI
document): too large, too deep, not UTF-8, not JSON; huge CSV lines; huge headers and query
strings. Each is refused with a clear 4xx in the one JSON error shape, never a 5xx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tests.hostile.conftest import Owner, client_address
from tests.hostile.openapi_walk import Document

MAX_BODY_BYTES = 5 * 1024 * 1024  # the gateway's default limit for a JSON body
BODIES: dict[str, bytes] = {
    "deep arrays": b"[" * 200_000 + b"]" * 200_000,
    "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "invalid UTF-8": b'{"name": "\xff\xfe\xc3\x28", "subject": "\xed\xa0\x80"}',
    "a lone surrogate": b'{"name": "\\ud800", "subject": "\\udfff", "email": "\\ud800@x.io"}',
    "not JSON": b"{'name': 1,}",
    "truncated": b'{"name": "abc',
    "a huge number": b'{"limit": 1' + b"0" * 5000 + b"}",
    "NUL": b'{"name": "a\\u0000b", "subject": "a\\u0000b", "email": "a\\u0000@example.com"}',
}


def _is_error(response: httpx.Response) -> bool:
    body = response.json()
    return isinstance(body, dict) and {"code", "message", "details"} <= set(body.get("error", {}))


def _concrete(path: str, owner: Owner) -> str:
    for name, value in owner.ids.items():
        path = path.replace("{" + name + "}", value)
    return path.replace("{token}", "t0k3n")


async def test_malformed_bodies_get_a_clear_4xx_everywhere(api: Document, owner: Owner):
    operations = [o for o in api.operations() if o.body_type == "application/json"]
    assert len(operations) > 20
    wrong = []
    for operation in operations:
        path = _concrete(operation.path, owner)
        for what, body in BODIES.items():
            response = await owner.call(
                operation.method,
                path,
                content=body,
                headers={"Content-Type": "application/json", "X-Forwarded-For": client_address()},
            )
            if not 400 <= response.status_code < 500 or not _is_error(response):
                wrong.append(
                    f"{operation.key} {what}: {response.status_code} {response.text[:200]}"
                )
    assert not wrong, "\n".join(wrong)


async def test_oversized_bodies_are_refused_with_413(api: Document, owner: Owner):
    large = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'

    async def streamed() -> AsyncIterator[bytes]:
        # No Content-Length: the gateway has to count as the body arrives.
        yield b'{"name": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    wrong = []
    for operation in (o for o in api.operations() if o.body_type == "application/json"):
        path = _concrete(operation.path, owner)
        for content in (large, streamed()):
            response = await owner.call(
                operation.method,
                path,
                content=content,
                headers={"Content-Type": "application/json", "X-Forwarded-For": client_address()},
            )
            if (
                response.status_code != 413
                or response.json()["error"]["code"] != "payload_too_large"
            ):
                wrong.append(f"{operation.key}: {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)


async def test_huge_headers_and_query_strings_are_refused(owner: Owner):
    problems = []
    for method, path, options in [
        ("GET", "/contacts", {"params": {"q": "x" * 60_000}}),
        ("GET", "/contacts?q=%ff%fe", {}),
        ("GET", "/contacts?q=%C3%28", {}),
        ("GET", "/reports?tag=%ED%A0%80", {}),
        ("GET", "/contacts/%ff%fe", {}),
        ("GET", "/unsubscribe/%ff%fe", {}),
        ("GET", "/contacts", {"headers": {"Authorization": "Bearer " + "x" * 100_000}}),
    ]:
        try:
            response = await owner.call(method, path, **options)
        except httpx.RemoteProtocolError:
            continue  # the server closed the connection on an oversized header: refused too
        if not 400 <= response.status_code < 500:
            problems.append(f"{method} {path} {list(options)}: {response.status_code}")
    assert not problems, "\n".join(problems)


async def _import(owner: Owner, content: bytes) -> httpx.Response:
    return await owner.call(
        "POST", "/contacts/import", files={"file": ("contacts.csv", content, "text/csv")}
    )


async def _finished(owner: Owner, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job = await owner.made("GET", f"/contacts/import/{job_id}", 200)
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def test_huge_csv_lines_are_refused_before_the_import_starts(owner: Owner):
    header = b"email,first_name\n"
    for content in (
        header + b"a@example.com," + b"x" * (6 << 20) + b"\n",  # one huge field
        header + b"y" * (9 << 20),  # one huge line without an end
        header + b"b@example.com" + b",x" * (3 << 20) + b"\n",  # a huge row of small fields
    ):
        response = await _import(owner, content)
        assert response.status_code == 422, response.text
        [detail] = response.json()["error"]["details"]
        assert detail["field"] == "file"
        assert "line 2" in detail["message"]
    # A row of many fields that fits is read, and reported as a bad row.
    wide = await _import(owner, header + b"c@example.com" + b",x" * 1000 + b"\n")
    assert wide.status_code == 202, wide.text
    job = await _finished(owner, wide.json()["job_id"])
    assert job["status"] == "succeeded"
    assert [e["field"] for e in job["errors"]] == ["row"]
