"""`GET /contacts?q=`: a case-insensitive prefix of the address, the first or the last name.

Each test uses a new account, so a prefix only has to be unique within the test.
"""

import uuid
from typing import Any

from tests.contacts.conftest import Account


async def found(account: Account, q: str, **params: Any) -> list[str]:
    """The ids `q` finds, every page of them."""
    return [c["id"] for c in await account.all_contacts(q=q, **params)]


async def test_q_is_a_case_insensitive_prefix_of_the_address_or_either_name(account: Account):
    ada = await account.contact("Ada.King@Example.com", first_name="Augusta", last_name="Lovelace")
    emile = await account.contact("e.zola@example.com", first_name="Émile", last_name="Zola")
    for q in ("ada.k", "ADA.KING@EX", "Ada.King@Example.com", "  ada  "):
        assert await found(account, q) == [ada["id"]], q
    for q in ("aug", "AUGUSTA", "love", "LoVeLaCe"):
        assert await found(account, q) == [ada["id"]], q
    for q in ("émile", "ÉMI", "zol", "E.ZOLA"):
        assert await found(account, q) == [emile["id"]], q
    # Folded as the database folds the names ("İ".lower() in Python is two characters).
    ilker = await account.contact("i.k@example.com", first_name="İlker", last_name="Kaya")
    for q in ("İL", "ilk", "İlker"):
        assert await found(account, q) == [ilker["id"]], q
    # A prefix that starts the address of one and a name of the other finds both, in id order.
    both = await account.contact("zed@example.com", first_name="Abe", last_name="Zed")
    assert await found(account, "z") == [emile["id"], both["id"]]
    assert await found(account, "A") == [ada["id"], both["id"]]


async def test_q_never_matches_inside_a_word(account: Account):
    await account.contact("dana.scully@example.com", first_name="Dana", last_name="Scully")
    for q in ("ana", "cully", "example", "@example.com", "a.scully", "ully@"):
        assert await found(account, q) == [], q


async def test_like_metacharacters_in_q_are_literal(account: Account):
    percent = await account.contact("p1@example.com", first_name="50%off")
    await account.contact("p2@example.com", first_name="50xoff")
    await account.contact("p3@example.com", first_name="500ff")
    underscore = await account.contact("snake_case@example.com", last_name="a_b")
    await account.contact("snakeXcase@example.com", last_name="axb")
    backslash = await account.contact("p4@example.com", first_name="x\\y")
    await account.contact("p5@example.com", first_name="x%y")
    await account.contact("p6@example.com", first_name="x_y")

    assert await found(account, "50%") == [percent["id"]]
    assert await found(account, "50%o") == [percent["id"]]
    assert await found(account, "%") == []
    assert await found(account, "_") == []
    assert await found(account, "snake_") == [underscore["id"]]
    assert await found(account, "a_") == [underscore["id"]]
    assert await found(account, "x\\") == [backslash["id"]]
    assert await found(account, "x\\%") == []
    assert await found(account, "x\\y") == [backslash["id"]]


async def test_paging_with_q_and_a_cursor_is_stable(account: Account):
    tag = uuid.uuid4().hex[:6]
    the_list = await account.new_list()
    matching = []
    for i in range(7):
        matching.append(
            await account.contact(f"m{i}-{tag}@example.com", first_name=f"Q{tag}", list_ids=[])
        )
        await account.contact(f"other{i}-{tag}@example.com", first_name=f"R{tag}")
    members = [m["id"] for m in matching]
    added = await account.call(
        "POST", f"/lists/{the_list['id']}/contacts", json={"contact_ids": members}
    )
    assert added.status_code == 200, added.text

    for params in ({}, {"list_id": the_list["id"]}):
        first = await account.call(
            "GET", "/contacts", params={"q": f"q{tag}", "limit": 3, **params}
        )
        assert first.status_code == 200, first.text
        assert [c["id"] for c in first.json()["items"]] == members[:3]
        cursor = first.json()["next_cursor"]
        assert cursor is not None
        second = await account.call(
            "GET", "/contacts", params={"q": f"q{tag}", "limit": 3, "cursor": cursor, **params}
        )
        assert [c["id"] for c in second.json()["items"]] == members[3:6]
        # The same cursor asked again gives the same page.
        again = await account.call(
            "GET", "/contacts", params={"q": f"q{tag}", "limit": 3, "cursor": cursor, **params}
        )
        assert again.json() == second.json()
        rest = await account.all_contacts(q=f"q{tag}", limit=3, cursor=cursor, **params)
        assert [c["id"] for c in rest] == members[3:]
        # A full last page still says it is the last.
        exact = await account.call(
            "GET", "/contacts", params={"q": f"q{tag}", "limit": 7, **params}
        )
        assert [c["id"] for c in exact.json()["items"]] == members
        assert exact.json()["next_cursor"] is None

    # A contact added while paging sorts after every earlier one: no page repeats or skips.
    first = await account.call("GET", "/contacts", params={"q": f"Q{tag}", "limit": 4})
    later = await account.contact(f"m-later-{tag}@example.com", last_name=f"q{tag}-later")
    rest = await account.all_contacts(q=f"q{tag}", limit=4, cursor=first.json()["next_cursor"])
    assert [c["id"] for c in first.json()["items"] + rest] == [*members, later["id"]]
    assert await found(account, f"Q{tag}", status="active") == [*members, later["id"]]


async def test_q_never_finds_another_accounts_contacts(account: Account, other: Account):
    tag = uuid.uuid4().hex[:6]
    mine = await account.contact(f"shared-{tag}@example.com", first_name=f"Twin{tag}")
    theirs = await other.contact(f"shared-{tag}@example.com", first_name=f"Twin{tag}")
    await other.contact(f"theirs-{tag}@example.com", last_name=f"Twin{tag}")
    for q in (f"shared-{tag}", f"twin{tag}", "t", "s"):
        assert await found(account, q) == [mine["id"]], q
    assert await found(other, f"shared-{tag}") == [theirs["id"]]
    their_list = await other.new_list()
    response = await account.call(
        "GET", "/contacts", params={"q": "s", "list_id": their_list["id"]}
    )
    assert response.status_code == 404


async def test_a_bad_q_is_a_422_naming_it(account: Account):
    for q in ("", "x" * 255):
        response = await account.call("GET", "/contacts", params={"q": q})
        assert response.status_code == 422, q
        assert [d["field"] for d in response.json()["error"]["details"]] == ["q"]
