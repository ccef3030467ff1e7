"""HTTP routes of the contacts service."""

from __future__ import annotations

import asyncio
import html
import uuid
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from contacts import exports, flows, imports, store
from contacts.schemas import (
    BulkResult,
    ContactCreate,
    ContactDetail,
    ContactOut,
    ContactPage,
    ContactPatch,
    ImportAccepted,
    ImportJobOut,
    ListCreate,
    ListOut,
    ListPage,
    ListPatch,
    MembersChange,
    MembersChanged,
    OwnedAnswer,
    OwnedQuery,
    RecipientsPage,
    RecipientsQuery,
    Status,
    SuppressedAnswer,
    SuppressedQuery,
    Unsubscribed,
)
from herald.db import Conn
from herald.errors import ERROR_RESPONSES, ApiError, not_found
from herald.links import LinkSigner, UnsubscribeToken
from herald.security import Principal, full_access, internal_caller

router = APIRouter(responses=ERROR_RESPONSES)

MAX_BULK = 1000
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'"
Caller = Annotated[Principal, Depends(full_access)]
Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
Cursor = Annotated[
    str | None, Query(max_length=100, description="`next_cursor` of the previous page.")
]


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.runtime.db
    return pool


def _importer(request: Request) -> imports.Importer:
    importer = request.app.state.runtime.extras["importer"]
    assert isinstance(importer, imports.Importer)
    return importer


Pool = Annotated[asyncpg.Pool, Depends(_pool)]


def _contact(row: asyncpg.Record) -> ContactOut:
    return ContactOut.model_validate(dict(row))


def _list(row: asyncpg.Record) -> ListOut:
    return ListOut.model_validate(dict(row))


async def _own_list(
    conn: Conn, account_id: uuid.UUID, list_id: uuid.UUID, field: str | None = None
) -> None:
    if not await store.existing_lists(conn, account_id=account_id, list_ids=[list_id]):
        raise ApiError(404, "not_found", "list not found", field=field)


async def _contact_page(
    pool: asyncpg.Pool,
    account_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    list_id: uuid.UUID | None,
    status: str | None,
    q: str | None = None,
) -> ContactPage:
    start = flows.after(cursor)
    async with pool.acquire() as conn:
        if list_id is not None:
            await _own_list(conn, account_id, list_id)
        rows = await store.page_contacts(
            conn,
            account_id=account_id,
            after=start,
            limit=limit + 1,
            list_id=list_id,
            status=status,
            q=q.strip() if q else None,
        )
    items, next_cursor = flows.page(rows, limit)
    return ContactPage(items=[_contact(r) for r in items], next_cursor=next_cursor)


# -- contacts -------------------------------------------------------------------------------------

# The body is one contact or an array of them, which FastAPI cannot declare from a signature;
# the contact's schema is inlined (it has no nested models), so the document needs no component
# that no route would otherwise register.
_CONTACT_SCHEMA = ContactCreate.model_json_schema()
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _CONTACT_SCHEMA,
                        {
                            "type": "array",
                            "maxItems": MAX_BULK,
                            "items": _CONTACT_SCHEMA,
                        },
                    ]
                }
            }
        },
    }
}


@router.post(
    "/contacts",
    status_code=201,
    response_model=ContactOut,
    tags=["contacts"],
    openapi_extra=_CREATE_BODY,
    responses={207: {"model": BulkResult, "description": "a JSON array: one answer per item"}},
)
async def create_contact(
    pool: Pool, principal: Caller, body: Annotated[Any, Body(include_in_schema=False)]
) -> Any:
    """Add a contact (`409` if the address is the account's already, in any letter case).

    A JSON array of up to 1,000 contacts is answered `207` with one outcome per item, in order:
    each item is created or refused on its own.
    """
    if isinstance(body, list):
        if len(body) > MAX_BULK:
            raise ApiError(422, "validation_error", f"at most {MAX_BULK} contacts", field="body")
        outcomes = await flows.create_contacts(
            pool, account_id=principal.account_id, items=flows.parse_items(body)
        )
        items = flows.bulk_items(outcomes)
        result = BulkResult(
            created=sum(1 for i in items if i.status == 201),
            failed=sum(1 for i in items if i.status != 201),
            items=items,
        )
        return JSONResponse(result.model_dump(mode="json"), status_code=207)
    try:
        item = ContactCreate.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    [outcome] = await flows.create_contacts(pool, account_id=principal.account_id, items=[item])
    if outcome.contact is None:
        assert outcome.error is not None
        error = outcome.error
        field = error.details[0].field if error.details else None
        raise ApiError(outcome.status, error.code, error.message, field=field)
    return _contact(outcome.contact)


@router.get("/contacts", response_model=ContactPage, tags=["contacts"])
async def list_contacts(
    pool: Pool,
    principal: Caller,
    limit: Limit = 50,
    cursor: Cursor = None,
    list_id: uuid.UUID | None = None,
    q: Annotated[
        str | None,
        Query(min_length=1, max_length=254, description="Prefix of the email or a name."),
    ] = None,
    status: Status | None = None,
) -> ContactPage:
    """Your contacts in a stable order, a keyset page at a time (as fast deep as shallow)."""
    return await _contact_page(
        pool,
        principal.account_id,
        limit=limit,
        cursor=cursor,
        list_id=list_id,
        status=status,
        q=q,
    )


@router.get(
    "/contacts/export",
    tags=["contacts"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "the contacts as CSV"}},
)
async def export_contacts(
    pool: Pool, principal: Caller, list_id: uuid.UUID | None = None
) -> StreamingResponse:
    """Download your contacts (or one list's) as CSV, streamed; cells that a spreadsheet would
    run as a formula are prefixed with `'`."""
    if list_id is not None:
        async with pool.acquire() as conn:
            await _own_list(conn, principal.account_id, list_id)
    return StreamingResponse(
        exports.export_csv(pool, account_id=principal.account_id, list_id=list_id),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="contacts.csv"',
            "Cache-Control": "no-store",
        },
    )


_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "CSV with a header row.",
                        },
                        "list_id": {
                            "type": "string",
                            "format": "uuid",
                            "description": "Put every imported contact on this list.",
                        },
                        "columns": {
                            "type": "string",
                            "description": "JSON object from header name to `email`,"
                            " `first_name`, `last_name`, `attributes.<name>` or `ignore`."
                            " Unmapped headers named like email/first name/last name are"
                            " recognised; others become attributes.",
                            "example": '{"E-Mail": "email", "Tier": "attributes.plan"}',
                        },
                        "encoding": {
                            "type": "string",
                            "enum": sorted(imports.ENCODINGS),
                            "default": "utf-8",
                        },
                        "delimiter": {
                            "type": "string",
                            "enum": [",", ";", "|", "\\t"],
                            "default": ",",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/contacts/import",
    status_code=202,
    response_model=ImportAccepted,
    tags=["import and export"],
    openapi_extra=_IMPORT_BODY,
)
async def import_contacts(
    request: Request, response: Response, pool: Pool, principal: Caller
) -> ImportAccepted:
    """Import a CSV file in the background; follow it at `/contacts/import/{job_id}`.

    Rows that fail their checks are skipped and listed by row number; the rest are applied
    together at the end (the last row of an address wins; empty cells keep what a contact had).
    Earlier rows of an address that comes again are counted and named as `duplicates`.
    """
    importer = _importer(request)
    settings = importer.settings
    job_id = uuid.uuid4()
    path = importer.upload_path(job_id)
    try:
        upload = await imports.receive_upload(request, path, max_bytes=settings.import_max_bytes)
        options = imports.options_from(upload.fields)
        list_id = _form_uuid(upload.fields.get("list_id"), "list_id")
        if list_id is not None:
            async with pool.acquire() as conn:
                await _own_list(conn, principal.account_id, list_id, field="list_id")
        plan = await asyncio.to_thread(imports.inspect_file, path, options)
        async with pool.acquire() as conn:
            await store.insert_job(
                conn,
                job_id=job_id,
                account_id=principal.account_id,
                list_id=list_id,
                filename=upload.filename,
                runner=importer.runner,
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    importer.submit(
        imports.Job(
            id=job_id,
            account_id=principal.account_id,
            list_id=list_id,
            path=path,
            options=options,
            plan=plan,
        )
    )
    response.headers["Location"] = f"/contacts/import/{job_id}"
    return ImportAccepted(job_id=job_id)


def _form_uuid(value: str | None, field: str) -> uuid.UUID | None:
    if value is None or not value.strip():
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise ApiError(422, "validation_error", "not a UUID", field=field) from None


@router.get("/contacts/import/{job_id}", response_model=ImportJobOut, tags=["import and export"])
async def import_status(job_id: uuid.UUID, pool: Pool, principal: Caller) -> ImportJobOut:
    """An import's progress, counts, and first errors and duplicates by row."""
    async with pool.acquire() as conn:
        job = await store.get_job(conn, account_id=principal.account_id, job_id=job_id)
    if job is None:
        raise not_found("import job")
    return ImportJobOut.model_validate(dict(job))


@router.get("/contacts/{contact_id}", response_model=ContactDetail, tags=["contacts"])
async def get_contact(contact_id: uuid.UUID, pool: Pool, principal: Caller) -> ContactDetail:
    """One of your contacts, with the lists it is on."""
    async with pool.acquire() as conn:
        row = await store.get_contact(conn, account_id=principal.account_id, contact_id=contact_id)
        if row is None:
            raise not_found("contact")
        list_ids = await store.lists_of(conn, account_id=principal.account_id, contact_id=row["id"])
    return ContactDetail.model_validate({**dict(row), "list_ids": list_ids})


@router.patch("/contacts/{contact_id}", response_model=ContactOut, tags=["contacts"])
async def patch_contact(
    contact_id: uuid.UUID, body: ContactPatch, pool: Pool, principal: Caller
) -> ContactOut:
    """Change a contact's address, names or attributes, or unsubscribe it by hand."""
    row = await flows.update_contact(
        pool, account_id=principal.account_id, contact_id=contact_id, patch=body
    )
    return _contact(row)


@router.delete("/contacts/{contact_id}", status_code=204, tags=["contacts"])
async def delete_contact(contact_id: uuid.UUID, pool: Pool, principal: Caller) -> Response:
    """Delete a contact (a suppressed address stays suppressed)."""
    async with pool.acquire() as conn:
        if not await store.delete_contact(
            conn, account_id=principal.account_id, contact_id=contact_id
        ):
            raise not_found("contact")
    return Response(status_code=204)


# -- lists ----------------------------------------------------------------------------------------


@router.post("/lists", status_code=201, response_model=ListOut, tags=["lists"])
async def create_list(body: ListCreate, pool: Pool, principal: Caller) -> ListOut:
    """Create a list (`409` if you have one of that name)."""
    async with pool.acquire() as conn:
        row = await store.insert_list(
            conn, account_id=principal.account_id, name=body.name, description=body.description
        )
    if row is None:
        raise ApiError(409, "conflict", "you have a list of that name", field="name")
    return _list(row)


@router.get("/lists", response_model=ListPage, tags=["lists"])
async def list_lists(
    pool: Pool, principal: Caller, limit: Limit = 50, cursor: Cursor = None
) -> ListPage:
    """Your lists with their member counts, a keyset page at a time."""
    start = flows.after(cursor)
    async with pool.acquire() as conn:
        rows = await store.page_lists(
            conn, account_id=principal.account_id, after=start, limit=limit + 1
        )
    items, cursor = flows.page(rows, limit)
    return ListPage(items=[_list(r) for r in items], next_cursor=cursor)


@router.get("/lists/{list_id}", response_model=ListOut, tags=["lists"])
async def get_list(list_id: uuid.UUID, pool: Pool, principal: Caller) -> ListOut:
    """One of your lists, with its member count."""
    async with pool.acquire() as conn:
        row = await store.get_list(conn, account_id=principal.account_id, list_id=list_id)
    if row is None:
        raise not_found("list")
    return _list(row)


@router.patch("/lists/{list_id}", response_model=ListOut, tags=["lists"])
async def patch_list(list_id: uuid.UUID, body: ListPatch, pool: Pool, principal: Caller) -> ListOut:
    """Rename a list or change its description."""
    async with pool.acquire() as conn, conn.transaction():
        if body.name is not None and await store.list_name_taken(
            conn, account_id=principal.account_id, name=body.name, other_than=list_id
        ):
            raise ApiError(409, "conflict", "you have a list of that name", field="name")
        updated = await store.update_list(
            conn,
            account_id=principal.account_id,
            list_id=list_id,
            name=body.name,
            description=body.description,
            set_description="description" in body.model_fields_set,
        )
        if updated is None:
            raise not_found("list")
        row = await store.get_list(conn, account_id=principal.account_id, list_id=list_id)
    assert row is not None
    return _list(row)


@router.delete("/lists/{list_id}", status_code=204, tags=["lists"])
async def delete_list(list_id: uuid.UUID, pool: Pool, principal: Caller) -> Response:
    """Delete a list (its contacts stay)."""
    async with pool.acquire() as conn:
        if not await store.delete_list(conn, account_id=principal.account_id, list_id=list_id):
            raise not_found("list")
    return Response(status_code=204)


async def _members(
    conn: Conn, account_id: uuid.UUID, list_id: uuid.UUID, body: MembersChange
) -> list[uuid.UUID]:
    """The contacts named, each once, after checking that they and the list are the account's."""
    await _own_list(conn, account_id, list_id)
    wanted = list(dict.fromkeys(body.contact_ids))
    known = await store.existing_contacts(conn, account_id=account_id, contact_ids=wanted)
    missing = [c for c in wanted if c not in known]
    if missing:
        raise ApiError(404, "not_found", f"contact {missing[0]} not found", field="contact_ids")
    return wanted


@router.post("/lists/{list_id}/contacts", response_model=MembersChanged, tags=["lists"])
async def add_members(
    list_id: uuid.UUID, body: MembersChange, pool: Pool, principal: Caller
) -> MembersChanged:
    """Put contacts on a list (those already on it stay once)."""
    async with pool.acquire() as conn, conn.transaction():
        wanted = await _members(conn, principal.account_id, list_id, body)
        added = await store.add_memberships(
            conn, account_id=principal.account_id, list_ids=[list_id], contact_ids=wanted
        )
    return MembersChanged(changed=added)


@router.delete("/lists/{list_id}/contacts", response_model=MembersChanged, tags=["lists"])
async def remove_members(
    list_id: uuid.UUID, body: MembersChange, pool: Pool, principal: Caller
) -> MembersChanged:
    """Take contacts off a list (the contacts stay)."""
    async with pool.acquire() as conn, conn.transaction():
        wanted = await _members(conn, principal.account_id, list_id, body)
        removed = await store.remove_memberships(
            conn, account_id=principal.account_id, list_id=list_id, contact_ids=wanted
        )
    return MembersChanged(changed=removed)


@router.get("/lists/{list_id}/contacts", response_model=ContactPage, tags=["lists"])
async def list_members(
    list_id: uuid.UUID,
    pool: Pool,
    principal: Caller,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: Status | None = None,
) -> ContactPage:
    """The contacts on a list, a keyset page at a time."""
    return await _contact_page(
        pool, principal.account_id, limit=limit, cursor=cursor, list_id=list_id, status=status
    )


# -- unsubscribe ----------------------------------------------------------------------------------


def _signer(request: Request) -> LinkSigner:
    signer = request.app.state.runtime.extras["links"]
    assert isinstance(signer, LinkSigner)
    return signer


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        "<meta name=robots content=noindex>"
        f"<title>{html.escape(title)}</title>"
        "<body style='font-family:system-ui;max-width:34rem;margin:4rem auto;padding:0 1rem'>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(
        document,
        status_code=status,
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


def _unsubscribed_page(address: str) -> HTMLResponse:
    return _page(
        "You are unsubscribed", f"<p>{html.escape(address)} will not get these emails again.</p>"
    )


def _broken_link() -> HTMLResponse:
    return _page(
        "This link does not work",
        "<p>The unsubscribe link is incomplete or was changed. Please use the link from the"
        " email exactly as it came.</p>",
        404,
    )


def _verify(request: Request, token: str) -> UnsubscribeToken | None:
    return _signer(request).verify("unsubscribe", token, UnsubscribeToken)


@router.get("/unsubscribe/{token}", response_class=HTMLResponse, tags=["unsubscribe"])
async def unsubscribe_page(token: str, request: Request, pool: Pool) -> HTMLResponse:
    """The page an unsubscribe link opens: it asks to confirm (opening it changes nothing, so
    mail scanners that follow links cannot unsubscribe anyone)."""
    claims = _verify(request, token)
    if claims is None:
        return _broken_link()
    address = flows.normalise_or_lower(claims.r)
    if await flows.is_suppressed(pool, token=claims):
        return _unsubscribed_page(address)
    action = html.escape(f"/unsubscribe/{token}", quote=True)
    return _page(
        "Unsubscribe?",
        f"<p>Stop sending these emails to <strong>{html.escape(address)}</strong>?</p>"
        f"<form method=post action='{action}'>"
        "<input type=hidden name=List-Unsubscribe value=One-Click>"
        "<button type=submit style='font-size:1rem;padding:.5rem 1rem'>Unsubscribe</button>"
        "</form>",
    )


@router.post(
    "/unsubscribe/{token}",
    tags=["unsubscribe"],
    response_model=Unsubscribed,
    responses={200: {"content": {"text/html": {}}}},
)
async def unsubscribe(token: str, request: Request, pool: Pool) -> Any:
    """Unsubscribe at once (RFC 8058 one-click: `List-Unsubscribe=One-Click`, or the page's
    form). Repeating it is harmless. Browsers get a page, mail providers JSON."""
    browser = "text/html" in request.headers.get("accept", "")
    claims = _verify(request, token)
    if claims is None:
        if browser:
            return _broken_link()
        raise not_found("unsubscribe link")
    email = await flows.unsubscribe(pool, token=claims)
    if browser:
        return _unsubscribed_page(email)
    return Unsubscribed(email=email)


# -- internal -------------------------------------------------------------------------------------


@router.post(
    "/internal/recipients",
    response_model=RecipientsPage,
    dependencies=[Depends(internal_caller)],
    include_in_schema=False,
)
async def recipients(body: RecipientsQuery, pool: Pool) -> Response:
    """The deliverable contacts on any of `list_ids` or in `contact_ids`, each once, by id."""
    start = flows.after(body.after, field="after")
    rows: list[asyncpg.Record] = []
    if body.list_ids or body.contact_ids:
        async with pool.acquire() as conn:
            rows = await store.recipients_page(
                conn,
                account_id=body.account_id,
                list_ids=body.list_ids,
                contact_ids=body.contact_ids,
                after=start,
                limit=body.limit + 1,
            )
    items, cursor = flows.page(rows, body.limit)
    # Every page of every send comes through here: the rows go out as they are (attributes as
    # the database wrote their JSON), not through models validated and dumped again.
    page = {
        "items": [
            {
                "email": r["email"],
                "contact_id": str(r["id"]),  # asyncpg's own UUID type, unknown to orjson
                "first_name": r["first_name"],
                "last_name": r["last_name"],
                "attributes": orjson.Fragment(r["attributes_json"]),
            }
            for r in items
        ],
        "next_cursor": cursor,
    }
    return Response(orjson.dumps(page), media_type="application/json")


@router.post(
    "/internal/owned",
    response_model=OwnedAnswer,
    dependencies=[Depends(internal_caller)],
    include_in_schema=False,
)
async def owned(body: OwnedQuery, pool: Pool) -> OwnedAnswer:
    """Which of the lists and contacts named are not the account's (an email's audience)."""
    async with pool.acquire() as conn:
        lists, contacts = await store.unknown_ids(
            conn,
            account_id=body.account_id,
            list_ids=body.list_ids,
            contact_ids=body.contact_ids,
        )
    return OwnedAnswer(unknown_list_ids=lists, unknown_contact_ids=contacts)


@router.post(
    "/internal/suppressed",
    response_model=SuppressedAnswer,
    dependencies=[Depends(internal_caller)],
    include_in_schema=False,
)
async def suppressed(body: SuppressedQuery, pool: Pool) -> SuppressedAnswer:
    """Which of these addresses must not receive campaign mail from the account."""
    async with pool.acquire() as conn:
        found = await flows.suppressed_among(conn, account_id=body.account_id, emails=body.emails)
    return SuppressedAnswer(suppressed=found)
