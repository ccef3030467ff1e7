"""SQL injection and XSS into every text field of every endpoint, found in the merged OpenAPI
document: nothing answers 5xx, what is stored comes back as the same inert text (JSON, never
HTML), and no answer to one account shows another account's data.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx

from tests.hostile.conftest import Owner, client_address
from tests.hostile.openapi_walk import (
    Document,
    Field,
    Operation,
    body_for,
    found_values,
    fresh_address,
    set_at,
)

PAYLOADS = (
    "<script>alert('herald')</script>",
    '"><img src=x onerror=alert(1)>',
    "'; DROP TABLE contacts; --",
    "x' OR '1'='1",
    "%' OR 1=1; SELECT pg_sleep(3); --",
    "\\'; $$ ; \\x27 ; `id`",
)
# A payload in an address field: addresses that carry quotes and HTML where the syntax allows.
ADDRESS_PAYLOADS = ("o'brien+'--@example.com", "x'or'1'='1@example.com", "<script>@example.com")
ADDRESS_NAMES = ("email", "to", "reply_to", "from_email")
# Secrets are stored as hashes and never returned; the answer is checked, the echo is not.
SECRET_NAMES = ("password", "current_password", "new_password", "token", "refresh_token")
# Ending the session the test runs on would turn every later answer into 401.
SKIPPED = {"POST /logout"}
# Valid bodies where the schema's required fields are not enough (rules across fields).
BASES: dict[str, dict[str, Any]] = {
    "POST /compose": {"subject": "s", "text": "t"},
    "POST /send": {"subject": "s", "text": "t"},
    "PATCH /emails/{email_id}": {},
}
# Where a created object is read back, when it is not at the path it was posted to + /{id}.
READ_BACK = {"POST /compose": "/emails/{id}", "POST /send": "/emails/{id}"}
# A SQL payload that reaches the database as SQL would stall the answer this long.
SLOW_SECONDS = 2.5


def _values(owner: Owner) -> dict[str, Any]:
    return {
        "email": fresh_address(),
        "to": fresh_address(),
        "username": f"h{uuid.uuid4().hex[:12]}",
        # Wrong on purpose: a password change must fail, or the test's own token would end.
        "current_password": "not-the-password-47-orbit",
        "password": "hostile-orbit-candle-92-harbor",
        "new_password": "hostile-orbit-candle-92-harbor",
        "code": "123456",
        "send_at": "2031-01-01T09:00:00+00:00",
        "list_ids": owner.ids["list_id"],
        "contact_ids": owner.ids["contact_id"],
        **{name: owner.ids[name] for name in ("list_id", "contact_id", "email_id", "job_id")},
        "key_id": owner.ids["key_id"],
        "user_id": owner.user_id,
    }


def _text_fields(document: Document, operation: Operation) -> list[Field]:
    fields = [p for p in operation.params if p.is_text]
    if operation.body_schema is not None and operation.body_type == "application/json":
        fields += [f for f in document.body_fields(operation.body_schema) if f.is_text]
    return fields


def _payloads(target: Field) -> tuple[str, ...]:
    return ADDRESS_PAYLOADS if target.name in ADDRESS_NAMES else PAYLOADS


def _echoes(answer: Any, target: Field, payload: str) -> list[Any]:
    """The values answered under the field's name, if none of them is the payload as sent."""
    found = []
    for value in found_values(answer, target.name):
        found += value if isinstance(value, list) else [value]
    texts = [v for v in found if isinstance(v, str)]
    if target.name in ADDRESS_NAMES:
        texts, payload = [t.lower() for t in texts], payload.lower()
    return texts if texts and payload not in texts else []


async def _attack(
    document: Document,
    operation: Operation,
    owner: Owner,
    headers: dict[str, str],
    target: Field,
    payload: str,
) -> httpx.Response:
    values = _values(owner)
    path = operation.path
    query: dict[str, Any] = {}
    for param in operation.params:
        value = payload if param is target else values.get(param.name)
        if param.location == "path":
            path = path.replace("{" + param.name + "}", quote(str(value), safe=""))
        elif param.location == "query" and (param is target or param.required):
            query[param.name] = value
    kwargs: dict[str, Any] = {"params": query}
    if operation.body_type == "application/json":
        base = {
            key: (fresh_address() if key == "to" and isinstance(value, str) else value)
            for key, value in BASES.get(operation.key, {}).items()
        }
        if operation.key == "POST /send":
            base["to"] = [fresh_address()]
        if target.location == "body":
            set_at(base, target.path, payload)
        kwargs["json"] = body_for(document, operation, values, base)
    headers = headers | {"X-Forwarded-For": client_address()}
    return await owner.gateway.request(operation.method, path, headers=headers, **kwargs)


async def _read_back(
    document: Document, owner: Owner, operation: Operation, answer: Any, headers: dict[str, str]
) -> Any | None:
    """The stored object again, read where the API keeps it (or the collection holding it)."""
    readable = {o.path for o in document.operations() if o.method == "get"}
    if operation.method in ("put", "patch"):
        path = operation.path
    elif isinstance(answer, dict) and "id" in answer:
        template = READ_BACK.get(operation.key)
        if template is None:
            one = [p for p in readable if p.rsplit("/", 1)[0] == operation.path and "{" in p]
            template = one[0].rsplit("/", 1)[0] + "/{id}" if one else operation.path
        path = template.replace("{id}", str(answer["id"]))
    else:
        return None
    for name, value in _values(owner).items():
        path = path.replace("{" + name + "}", str(value))
    if "{" in path:
        return None
    response = await owner.gateway.get(path, headers=headers)
    return response.json() if response.status_code == 200 else None


async def test_injected_text_is_stored_and_returned_as_inert_text(
    api: Document, owner: Owner, stranger: Owner, admin_headers: dict[str, str]
):
    attacked: set[str] = set()
    stored: set[str] = set()
    problems: list[str] = []
    # The profile last: a changed address is unverified, and sending needs a verified one.
    for operation in sorted(api.operations(), key=lambda o: o.path == "/profile"):
        if operation.key in SKIPPED:
            continue
        headers = admin_headers if operation.path.startswith("/admin") else owner.headers
        for target in _text_fields(api, operation):
            for payload in _payloads(target):
                what = f"{operation.key} {target.location}:{target.label} {payload!r}"
                started = time.monotonic()
                response = await _attack(api, operation, owner, headers, target, payload)
                took = time.monotonic() - started
                attacked.add(f"{operation.key} {target.label}")
                if response.status_code >= 500:
                    problems.append(f"{what}: {response.status_code} {response.text[:300]}")
                    continue
                if took > SLOW_SECONDS:
                    problems.append(f"{what}: took {took:.1f} s (reached the database as SQL?)")
                kind = response.headers.get("content-type", "")
                if kind.startswith("text/html") and payload in response.text:
                    problems.append(f"{what}: reflected unescaped into HTML")
                if not kind.startswith("application/json"):
                    continue
                answer = response.json()
                if stranger.ids["contact_id"] in response.text or stranger.email in response.text:
                    problems.append(f"{what}: the answer shows another account's data")
                if response.status_code >= 300 or target.name in SECRET_NAMES:
                    continue
                if wrong := _echoes(answer, target, payload):
                    problems.append(f"{what}: answered as {wrong!r}")
                if operation.method == "get":
                    continue
                again = await _read_back(api, owner, operation, answer, headers)
                if again is None:
                    continue
                if wrong := _echoes(again, target, payload):
                    problems.append(f"{what}: read back as {wrong!r}")
                elif any(True for _ in found_values(again, target.name)):
                    stored.add(f"{operation.key} {target.label}")
    assert not problems, "\n".join(problems)
    # The walk reached the places where user text is kept; if not, it is broken, not the API.
    assert {
        "POST /contacts first_name",
        "POST /lists name",
        "POST /compose subject",
        "POST /compose html",
        "PUT /profile display_name",
        "POST /api-keys name",
    } <= stored, sorted(stored)
    assert {"GET /contacts q", "GET /reports tag", "GET /unsubscribe/{token} token"} <= attacked
