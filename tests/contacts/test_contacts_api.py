"""The contacts API through the gateway: contacts, lists, import, export, tenant isolation."""

import csv
import io
import uuid

import httpx

from tests.contacts.conftest import Account


def fields(response: httpx.Response) -> list[str]:
    return [d["field"] for d in response.json()["error"]["details"]]


# -- contacts -------------------------------------------------------------------------------------


async def test_create_normalises_and_refuses_a_duplicate_in_any_case(account: Account):
    tag = uuid.uuid4().hex[:8]
    created = await account.contact(
        f"Ada.{tag}@Example.COM",
        first_name="Ada",
        last_name="Lovelace",
        attributes={"plan": "pro", "seats": 3},
    )
    assert created["email"] == f"Ada.{tag}@example.com"
    assert created["status"] == "active"
    assert created["attributes"] == {"plan": "pro", "seats": 3}
    assert {"id", "created_at", "updated_at"} <= set(created)
    again = await account.call("POST", "/contacts", json={"email": f"ada.{tag}@EXAMPLE.com"})
    assert again.status_code == 409, again.text
    assert fields(again) == ["email"]
    fetched = await account.call("GET", f"/contacts/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["list_ids"] == []


async def test_create_validates_each_field(account: Account):
    cases = [
        ({"email": "not-an-address"}, "email"),
        ({"email": "a@b.test"}, "email"),
        ({}, "email"),
        ({"email": "x@example.com", "first_name": "x" * 201}, "first_name"),
        ({"email": "x@example.com", "attributes": {"not an identifier": 1}}, "attributes"),
        ({"email": "x@example.com", "attributes": {"big": "x" * (1 << 20)}}, "attributes"),
        ({"email": "x@example.com", "unknown": 1}, "unknown"),
        ({"email": "x@example.com", "list_ids": ["nope"]}, "list_ids.0"),
    ]
    for body, field in cases:
        response = await account.call("POST", "/contacts", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in fields(response), (body, response.text)


async def test_a_megabyte_attribute_is_refused_with_a_4xx(account: Account):
    response = await account.call(
        "POST",
        "/contacts",
        json={"email": f"big-{uuid.uuid4().hex[:8]}@example.com", "attributes": {"a": "x" * 2**20}},
    )
    assert 400 <= response.status_code < 500, response.text
    assert fields(response) == ["attributes"]


async def test_sql_and_html_in_names_are_stored_and_returned_as_text(account: Account):
    sql = "Robert'); DROP TABLE contacts;--"
    markup = "<script>alert(1)</script>&amp;"
    created = await account.contact(first_name=sql, last_name=markup, attributes={"x": markup})
    fetched = (await account.call("GET", f"/contacts/{created['id']}")).json()
    assert (fetched["first_name"], fetched["last_name"]) == (sql, markup)
    assert fetched["attributes"] == {"x": markup}
    found = await account.call("GET", "/contacts", params={"q": "robert'); drop"})
    assert [c["id"] for c in found.json()["items"]] == [created["id"]]


async def test_bulk_create_answers_per_item(account: Account):
    tag = uuid.uuid4().hex[:8]
    existing = await account.contact(f"old-{tag}@example.com")
    the_list = await account.new_list()
    body = [
        {"email": f"one-{tag}@example.com", "list_ids": [the_list["id"]]},
        {"email": "broken"},
        {"email": existing["email"].upper()},
        {"email": f"ONE-{tag}@example.com"},
        {"email": f"two-{tag}@example.com", "list_ids": [str(uuid.uuid4())]},
        {"email": f"three-{tag}@example.com", "first_name": "Three"},
    ]
    response = await account.call("POST", "/contacts", json=body)
    assert response.status_code == 207, response.text
    answer = response.json()
    assert [i["status"] for i in answer["items"]] == [201, 422, 409, 409, 404, 201]
    assert (answer["created"], answer["failed"]) == (2, 4)
    assert answer["items"][1]["error"]["details"][0]["field"] == "email"
    assert answer["items"][5]["contact"]["first_name"] == "Three"
    members = await account.call("GET", f"/lists/{the_list['id']}/contacts")
    assert [c["email"] for c in members.json()["items"]] == [f"one-{tag}@example.com"]
    too_many = await account.call("POST", "/contacts", json=[{"email": "a@example.com"}] * 1001)
    assert too_many.status_code == 422


async def test_pages_are_stable_and_filters_work(account: Account):
    made = [
        await account.contact(f"p{i}-{uuid.uuid4().hex[:6]}@example.com", first_name=f"N{i}")
        for i in range(7)
    ]
    first = await account.call("GET", "/contacts", params={"limit": 3})
    assert [c["id"] for c in first.json()["items"]] == [c["id"] for c in made[:3]]
    cursor = first.json()["next_cursor"]
    await account.contact(f"later-{uuid.uuid4().hex[:6]}@example.com")  # inserted mid-paging
    rest = await account.all_contacts(limit=3, cursor=cursor)
    assert [c["id"] for c in rest][:4] == [c["id"] for c in made[3:]]
    assert len(rest) == 5
    exact = await account.call("GET", "/contacts", params={"limit": 8})
    assert len(exact.json()["items"]) == 8
    assert exact.json()["next_cursor"] is None  # a full last page still says it is the last
    by_name = await account.call("GET", "/contacts", params={"q": "n4"})
    assert [c["id"] for c in by_name.json()["items"]] == [made[4]["id"]]
    by_email = await account.call("GET", "/contacts", params={"q": made[2]["email"][:5].upper()})
    assert [c["id"] for c in by_email.json()["items"]] == [made[2]["id"]]
    await account.call("PATCH", f"/contacts/{made[1]['id']}", json={"status": "unsubscribed"})
    gone = await account.call("GET", "/contacts", params={"status": "unsubscribed"})
    assert [c["id"] for c in gone.json()["items"]] == [made[1]["id"]]
    bad = await account.call("GET", "/contacts", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert bad.status_code == 422
    assert fields(bad) == ["cursor"]
    bad = await account.call("GET", "/contacts", params={"status": "gone", "limit": 0})
    assert bad.status_code == 422
    assert set(fields(bad)) == {"status", "limit"}


async def test_patch_and_delete(account: Account):
    tag = uuid.uuid4().hex[:8]
    contact = await account.contact(f"pat-{tag}@example.com", first_name="P")
    taken = await account.contact(f"taken-{tag}@example.com")
    response = await account.call(
        "PATCH",
        f"/contacts/{contact['id']}",
        json={"last_name": "Q", "attributes": {"tier": "gold"}, "email": f"New-{tag}@Example.com"},
    )
    assert response.status_code == 200, response.text
    patched = response.json()
    assert (patched["first_name"], patched["last_name"]) == ("P", "Q")
    assert patched["email"] == f"New-{tag}@example.com"
    assert patched["attributes"] == {"tier": "gold"}
    conflict = await account.call(
        "PATCH", f"/contacts/{contact['id']}", json={"email": taken["email"]}
    )
    assert conflict.status_code == 409
    assert fields(conflict) == ["email"]
    refused = await account.call("PATCH", f"/contacts/{contact['id']}", json={"status": "active"})
    assert refused.status_code == 422
    assert (await account.call("DELETE", f"/contacts/{contact['id']}")).status_code == 204
    assert (await account.call("GET", f"/contacts/{contact['id']}")).status_code == 404
    assert (await account.call("DELETE", f"/contacts/{contact['id']}")).status_code == 404


async def test_a_suppressed_address_stays_suppressed_when_added_again(account: Account):
    contact = await account.contact()
    response = await account.call(
        "PATCH", f"/contacts/{contact['id']}", json={"status": "unsubscribed"}
    )
    assert response.json()["status"] == "unsubscribed"
    await account.call("DELETE", f"/contacts/{contact['id']}")
    again = await account.contact(contact["email"])
    assert again["status"] == "unsubscribed"


async def test_another_accounts_objects_are_not_found(account: Account, other: Account):
    contact = await other.contact()
    the_list = await other.new_list()
    mine = await account.contact()
    my_list = await account.new_list()
    for method, path, body in [
        ("GET", f"/contacts/{contact['id']}", None),
        ("PATCH", f"/contacts/{contact['id']}", {"first_name": "x"}),
        ("DELETE", f"/contacts/{contact['id']}", None),
        ("GET", f"/lists/{the_list['id']}", None),
        ("PATCH", f"/lists/{the_list['id']}", {"name": "mine now"}),
        ("DELETE", f"/lists/{the_list['id']}", None),
        ("GET", f"/lists/{the_list['id']}/contacts", None),
        ("POST", f"/lists/{the_list['id']}/contacts", {"contact_ids": [mine["id"]]}),
        ("POST", f"/lists/{my_list['id']}/contacts", {"contact_ids": [contact["id"]]}),
        ("DELETE", f"/lists/{my_list['id']}/contacts", {"contact_ids": [contact["id"]]}),
        ("GET", f"/contacts?list_id={the_list['id']}", None),
        ("GET", f"/contacts/export?list_id={the_list['id']}", None),
    ]:
        response = await account.call(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
    bulk = await account.call(
        "POST", "/contacts", json=[{"email": "x@example.com", "list_ids": [the_list["id"]]}]
    )
    assert bulk.json()["items"][0]["status"] == 404
    # Another account may hold the same address: uniqueness is per account.
    assert (await account.contact(contact["email"]))["email"] == contact["email"]
    assert (await other.call("GET", f"/contacts/{contact['id']}")).status_code == 200
    theirs = await other.all_contacts()
    assert [c["id"] for c in theirs] == [contact["id"]]


async def test_endpoints_need_a_full_access_token(gateway: httpx.AsyncClient, mint_token):
    assert (await gateway.get("/contacts")).status_code == 401
    send_only = {"Authorization": f"Bearer {mint_token(scope='send')}"}
    assert (await gateway.get("/lists", headers=send_only)).status_code == 403
    assert (await gateway.post("/internal/recipients", json={})).status_code == 404


# -- lists ----------------------------------------------------------------------------------------


async def test_lists_with_member_counts(account: Account):
    the_list = await account.new_list("Newsletter")
    assert the_list["member_count"] == 0
    duplicate = await account.call("POST", "/lists", json={"name": "NEWSLETTER"})
    assert duplicate.status_code == 409
    assert fields(duplicate) == ["name"]
    assert (await account.call("POST", "/lists", json={"name": ""})).status_code == 422
    people = [await account.contact() for _ in range(3)]
    ids = [p["id"] for p in people]
    added = await account.call(
        "POST", f"/lists/{the_list['id']}/contacts", json={"contact_ids": [*ids, ids[0]]}
    )
    assert added.json() == {"changed": 3}
    again = await account.call(
        "POST", f"/lists/{the_list['id']}/contacts", json={"contact_ids": ids}
    )
    assert again.json() == {"changed": 0}
    removed = await account.call(
        "DELETE", f"/lists/{the_list['id']}/contacts", json={"contact_ids": ids[:1]}
    )
    assert removed.json() == {"changed": 1}
    members = await account.call("GET", f"/lists/{the_list['id']}/contacts", params={"limit": 1})
    assert [c["id"] for c in members.json()["items"]] == [ids[1]]
    assert members.json()["next_cursor"]
    other_list = await account.new_list()
    lists = (await account.call("GET", "/lists")).json()
    counts = {item["id"]: item["member_count"] for item in lists["items"]}
    assert counts == {the_list["id"]: 2, other_list["id"]: 0}
    patched = await account.call(
        "PATCH", f"/lists/{the_list['id']}", json={"name": "Weekly", "description": "<b>x</b>"}
    )
    assert patched.json()["name"] == "Weekly"
    assert patched.json()["description"] == "<b>x</b>"
    assert patched.json()["member_count"] == 2
    clash = await account.call("PATCH", f"/lists/{other_list['id']}", json={"name": "weekly"})
    assert clash.status_code == 409
    assert (await account.call("DELETE", f"/lists/{the_list['id']}")).status_code == 204
    assert (await account.call("GET", f"/contacts/{ids[1]}")).status_code == 200


# -- import ---------------------------------------------------------------------------------------


def csv_bytes(rows: list[list[str]], encoding: str = "utf-8") -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode(encoding)


async def test_import_reports_bad_rows_and_applies_the_rest(account: Account):
    tag = uuid.uuid4().hex[:8]
    existing = await account.contact(f"known-{tag}@example.com", first_name="Old")
    the_list = await account.new_list()
    rows = [
        ["Email", "First Name", "last_name", "Plan", "City"],
        [f"a-{tag}@Example.com", "Ann", "A", "pro", "Paris"],
        ["not-an-address", "Bad", "", "", ""],
        [f"KNOWN-{tag}@example.com", "", "Known", "basic", ""],
        [f"b-{tag}@example.com", "Ben"],
        [f"a-{tag}@example.com", "Anne", "", "", "Lyon"],
        [f"c-{tag}@example.com", '=HYPERLINK("x")', "Robert'); DROP TABLE contacts;--", "", ""],
        ["", "No", "Address", "", ""],
    ]
    job = await account.finished_import(csv_bytes(rows), list_id=the_list["id"])
    assert job["status"] == "succeeded", job
    assert job["rows_read"] == 7
    assert (job["created"], job["updated"], job["skipped"]) == (2, 1, 4)
    assert job["error_count"] == 3
    assert [(e["row"], e["field"]) for e in job["errors"]] == [
        (3, "email"),
        (5, "row"),
        (8, "email"),
    ]
    everyone = {c["email"]: c for c in await account.all_contacts()}
    ann = everyone[f"a-{tag}@example.com"]
    # Of two rows with one address the last one wins, whole.
    assert (ann["first_name"], ann["last_name"]) == ("Anne", None)
    assert ann["attributes"] == {"city": "Lyon"}
    known = everyone[existing["email"]]
    assert (known["first_name"], known["last_name"]) == ("Old", "Known")
    assert known["attributes"] == {"plan": "basic"}
    assert everyone[f"c-{tag}@example.com"]["last_name"] == "Robert'); DROP TABLE contacts;--"
    members = await account.all_contacts(list_id=the_list["id"])
    assert len(members) == 3


async def test_import_refuses_what_it_cannot_read(account: Account):
    latin1 = csv_bytes([["email", "first_name"], ["x@example.com", "Zoë"]], "latin-1")
    cases: list[tuple[httpx.Response, int, str]] = [
        (await account.upload(latin1), 422, "file"),
        (await account.upload(b""), 422, "file"),
        (await account.upload(csv_bytes([["name", "city"], ["a", "b"]])), 422, "file"),
        (await account.upload(csv_bytes([["email"]]), list_id="nope"), 422, "list_id"),
        (await account.upload(csv_bytes([["email"]]), list_id=str(uuid.uuid4())), 404, "list_id"),
        (await account.upload(csv_bytes([["email"]]), encoding="ebcdic"), 422, "encoding"),
        (await account.upload(csv_bytes([["mail", "x"]]), columns="[1]"), 422, "columns"),
        (
            await account.upload(csv_bytes([["a", "b"]]), columns='{"a": "email", "zz": "email"}'),
            422,
            "columns",
        ),
        (await account.upload(csv_bytes([["email", "2024"]])), 422, "file"),
        (
            await account.call("POST", "/contacts/import", json={"file": "email\nx@example.com"}),
            415,
            "file",
        ),
        (await account.call("POST", "/contacts/import", data={"list_id": ""}), 415, "file"),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.text
        if status != 415:  # the gateway may answer that one itself, naming Content-Type
            assert fields(response) == [field], response.text
    # What was refused left no job and no file behind.
    no_file = await account.call(
        "POST", "/contacts/import", files={"other": ("x.csv", b"email\n", "text/csv")}
    )
    assert no_file.status_code == 422
    assert fields(no_file) == ["file"]


async def test_import_reads_other_encodings_delimiters_and_mappings(account: Account):
    tag = uuid.uuid4().hex[:8]
    content = f"E-Mail;Vorname;Prix (€)\r\nzoe-{tag}@example.com;Zoë;12\r\n".encode("cp1252")
    job = await account.finished_import(
        content,
        encoding="windows-1252",
        delimiter=";",
        columns='{"E-Mail": "email", "Vorname": "first_name", "Prix (€)": "attributes.price"}',
    )
    assert job["status"] == "succeeded", job
    assert job["created"] == 1, job
    [zoe] = await account.all_contacts(q=f"zoe-{tag}")
    assert zoe["first_name"] == "Zoë"
    assert zoe["attributes"] == {"price": "12"}
    bom = "\ufeffemail,first_name\r\n".encode() + f"bom-{tag}@example.com,B\r\n".encode()
    job = await account.finished_import(bom)
    assert job["created"] == 1, job


async def test_an_unreadable_row_fails_the_whole_import_and_changes_nothing(account: Account):
    tag = uuid.uuid4().hex[:8]
    # One field past what the reader accepts, quoted across short lines (a single line that
    # long is refused at upload, before any job starts).
    huge = '"' + ("x" * 1023 + "\n") * 5 * 1024 + '"'
    content = f"email,note\nfirst-{tag}@example.com,ok\nsecond-{tag}@example.com,{huge}\n"
    job = await account.finished_import(content.encode())
    assert job["status"] == "failed", job
    assert "row 3" in job["failure_reason"]
    assert (job["created"], job["updated"]) == (0, 0)
    assert await account.all_contacts(q=f"first-{tag}") == []


async def test_import_status_is_per_account(account: Account, other: Account):
    response = await account.upload(csv_bytes([["email"], [f"i-{uuid.uuid4().hex}@example.com"]]))
    job_id = response.json()["job_id"]
    assert (await other.call("GET", f"/contacts/import/{job_id}")).status_code == 404
    assert (await account.call("GET", f"/contacts/import/{uuid.uuid4()}")).status_code == 404


# -- export ---------------------------------------------------------------------------------------


async def test_export_streams_csv_with_formulas_neutralised(account: Account):
    tag = uuid.uuid4().hex[:8]
    the_list = await account.new_list()
    plain = await account.contact(
        f"plain-{tag}@example.com", first_name="Plain", attributes={"plan": "pro", "n": 2}
    )
    risky = await account.contact(
        f"risky-{tag}@example.com",
        first_name="=1+2",
        last_name="@SUM(A1)",
        attributes={"status": "-3", "note": "\tx"},
        list_ids=[the_list["id"]],
    )
    response = await account.call("GET", "/contacts/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["id"] for r in rows] == [plain["id"], risky["id"]]
    assert rows[0]["plan"] == "pro"
    assert rows[0]["n"] == "2"
    assert rows[0]["note"] == ""
    assert (rows[1]["first_name"], rows[1]["last_name"]) == ("'=1+2", "'@SUM(A1)")
    assert rows[1]["attributes.status"] == "'-3"
    assert rows[1]["status"] == "active"
    assert rows[1]["note"] == "'\tx"
    listed = await account.call("GET", "/contacts/export", params={"list_id": the_list["id"]})
    assert [r["id"] for r in csv.DictReader(io.StringIO(listed.text))] == [risky["id"]]


async def test_export_then_import_round_trips(account: Account, other: Account):
    await account.contact(first_name="Round", attributes={"plan": "pro"})
    exported = (await account.call("GET", "/contacts/export")).content
    job = await other.finished_import(
        exported,
        columns='{"id": "ignore", "status": "ignore",'
        ' "created_at": "ignore", "updated_at": "ignore"}',
    )
    assert job["status"] == "succeeded", job
    assert job["created"] == 1, job
    [copy] = await other.all_contacts()
    assert (copy["first_name"], copy["attributes"]) == ("Round", {"plan": "pro"})


async def test_twenty_thousand_rows_import_in_one_job(account: Account):
    rows = [["email", "first_name", "plan"]] + [
        [f"bulk{i}-{uuid.uuid4().hex[:6]}@example.com", f"N{i}", "free"] for i in range(20_000)
    ]
    job = await account.finished_import(csv_bytes(rows))
    assert job["status"] == "succeeded", job
    assert job["created"] == 20_000, job
    page = await account.call("GET", "/contacts", params={"limit": 500})
    assert len(page.json()["items"]) == 500
