"""What the fast import path keeps: file order in the ids, NUL rows refused by number."""

import uuid

from tests.contacts.conftest import Account


async def test_imported_contacts_keep_the_file_order_and_their_ids_on_a_second_import(
    account: Account,
):
    tag = uuid.uuid4().hex[:8]
    earlier = await account.contact(f"earlier-{tag}@example.com")
    addresses = [f"{name}-{tag}@example.com" for name in ("zed", "amy", "mia", "bob")]
    lines = ["email,first_name"] + [f"{a},N{i}" for i, a in enumerate(addresses)]
    # A NUL anywhere in the file: that row is refused, named by its number; the rest go in.
    lines.insert(3, f"nul-{tag}@example.com,A\x00B")
    content = ("\r\n".join(lines) + "\r\n").encode()
    job = await account.finished_import(content)
    assert job["status"] == "succeeded", job
    assert (job["created"], job["updated"], job["error_count"]) == (4, 0, 1), job
    assert [(e["row"], e["field"]) for e in job["errors"]] == [(4, "row")]
    # Pages are ordered by id: the new contacts follow the older one, in the file's order.
    listed = await account.all_contacts()
    assert [c["email"] for c in listed] == [earlier["email"], *addresses]
    ids = [c["id"] for c in listed]
    again = await account.finished_import(content)
    assert (again["created"], again["updated"]) == (0, 4), again
    assert [c["id"] for c in await account.all_contacts()] == ids
    after = await account.finished_import(f"email\r\nlate-{tag}@example.com\r\n".encode())
    assert after["created"] == 1, after
    assert (await account.all_contacts())[-1]["email"] == f"late-{tag}@example.com"
