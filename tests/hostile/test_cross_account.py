"""Another account's ids are not found: every id an endpoint takes (path, query or body), found
in the merged OpenAPI document, is tried with an object of another account and must give 404.

Each attack is paired with a control, the same request with the caller's own id, which must not
give 404 or 422: so a 404 means "not yours", never "this request was malformed anyway".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.hostile.conftest import Owner
from tests.hostile.openapi_walk import Document, Field, Operation, body_for, fresh_address

# Administrators see every account by design; their endpoints are checked for the 403 of others.
ADMIN_PREFIX = "/admin"
# The id an endpoint takes, by the name it gives it: which of an owner's objects it names.
KIND_OF = {
    "list_id": "list_id",
    "list_ids": "list_id",
    "contact_id": "contact_id",
    "contact_ids": "contact_id",
    "email_id": "email_id",
    "job_id": "job_id",
    "key_id": "key_id",
    "session_id": "session_id",
}
# Endpoints that read what happened to a sent email name it `email_id` too.
SENT_EMAIL_PATHS = ("/tracking", "/reports")
# Whatever else a body needs to be valid apart from its ids.
BASES: dict[str, dict[str, Any]] = {
    "POST /compose": {"subject": "s", "text": "t"},
}


def _values(caller: Owner, operation: Operation) -> dict[str, Any]:
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    values: dict[str, Any] = {"send_at": later, "to": fresh_address(), "email": fresh_address()}
    for name, kind in KIND_OF.items():
        if kind == "email_id" and operation.path.startswith(SENT_EMAIL_PATHS):
            kind = "sent_email_id"
        values[name] = caller.ids[kind]
    return values


def _id_fields(document: Document, operation: Operation) -> list[Field]:
    fields = [p for p in operation.params if p.is_id]
    if operation.body_schema is not None and operation.body_type == "application/json":
        fields += [f for f in document.body_fields(operation.body_schema) if f.is_id]
    return fields


async def _request(
    document: Document, operation: Operation, caller: Owner, target: Field, owner: Owner
) -> httpx.Response:
    """`operation` by `caller`, with its own ids everywhere except `target`: `owner`'s."""
    mine = _values(caller, operation)
    theirs = _values(owner, operation)
    values = mine | {target.name: theirs[target.name]}
    path = operation.path
    query: dict[str, Any] = {}
    for param in operation.params:
        if param.location == "path":
            path = path.replace("{" + param.name + "}", str(values[param.name]))
        elif param.location == "query" and (param.required or param is target):
            query[param.name] = values[param.name]
    kwargs: dict[str, Any] = {"params": query}
    if operation.body_type == "application/json":
        base = dict(BASES.get(operation.key, {}))
        if target.location == "body":
            base[target.path[0]] = (
                [values[target.name]] if "[]" in target.path else values[target.name]
            )
        kwargs["json"] = body_for(document, operation, values, base)
    return await caller.call(operation.method, path, **kwargs)


async def test_another_accounts_ids_are_not_found_anywhere(
    api: Document, owner: Owner, stranger: Owner
):
    attacks = [
        (operation, target)
        for operation in api.operations()
        if not operation.public and not operation.path.startswith(ADMIN_PREFIX)
        for target in _id_fields(api, operation)
        if target.name in KIND_OF
    ]
    paths = {operation.path for operation, _ in attacks}
    # The enumeration found the endpoints; if these go missing, the walk is broken, not the API.
    assert {"/contacts/{contact_id}", "/lists/{list_id}/contacts", "/tracking/{email_id}"} <= paths
    assert not [
        o.key
        for o in api.operations()
        if "{" in o.path and not o.public and not o.path.startswith(ADMIN_PREFIX)
        if not _id_fields(api, o)
    ], "an endpoint takes an id that is not a uuid: add it to this test"

    leaks = []
    for operation, target in attacks:
        response = await _request(api, operation, stranger, target, owner)
        if response.status_code != 404:
            leaks.append(f"{operation.key} {target.label}: {response.status_code} {response.text}")
    assert not leaks, "\n".join(leaks)

    # Controls, deletions last, inner objects before the ones holding them, and the session
    # at the very end (deleting one's own session ends the caller's token).
    def order(attack: tuple[Operation, Field]) -> tuple[bool, bool, int]:
        operation = attack[0]
        return operation.method == "delete", "session" in operation.path, -len(operation.path)

    wrong = []
    for operation, target in sorted(attacks, key=order):
        response = await _request(api, operation, stranger, target, stranger)
        if response.status_code in (404, 422) or response.status_code >= 500:
            wrong.append(f"{operation.key} {target.label}: {response.status_code} {response.text}")
    assert not wrong, "own ids must work, or the 404s above prove nothing:\n" + "\n".join(wrong)

    # Nothing of the owner's was touched by the attempts.
    for path in (
        f"/lists/{owner.ids['list_id']}",
        f"/contacts/{owner.ids['contact_id']}",
        f"/contacts/import/{owner.ids['job_id']}",
        f"/tracking/{owner.ids['sent_email_id']}",
    ):
        assert (await owner.call("GET", path)).status_code == 200, path
    draft = await owner.made("GET", f"/emails/{owner.ids['email_id']}", 200)
    assert draft["status"] == "draft"
    assert draft["subject"].endswith(" draft")
    members = await owner.made("GET", f"/lists/{owner.ids['list_id']}/contacts", 200)
    assert [c["id"] for c in members["items"]] == [owner.ids["contact_id"]]
    keys = (await owner.call("GET", "/api-keys")).json()
    assert owner.ids["key_id"] in {k["id"] for k in keys}
    sessions = (await owner.call("GET", "/sessions")).json()
    assert owner.ids["session_id"] in {s["id"] for s in sessions}


async def test_admin_endpoints_answer_403_to_users(api: Document, owner: Owner):
    admin_operations = [o for o in api.operations() if o.path.startswith(ADMIN_PREFIX)]
    assert admin_operations
    for operation in admin_operations:
        path = operation.path.replace("{user_id}", owner.user_id)
        response = await owner.call(operation.method, path, json={})
        assert response.status_code == 403, (operation.key, response.text)
