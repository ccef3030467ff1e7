"""Suppression end to end: one-click unsubscribe, bounces and complaints from Kafka, the
internal endpoints the scheduler sends by, and an import interrupted by a crash."""

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from herald.devinfra.stack import Stack
from herald.events import Envelope, EventData, decode
from herald.events.contacts import ContactSuppressed
from herald.events.tracking import EmailBounced, EmailComplained
from herald.links import ClickToken, LinkSigner, UnsubscribeToken
from tests.conftest import TokenMaker
from tests.contacts.conftest import Account as Caller


class Account(Caller):
    """A caller that also reads contacts' statuses and makes lists by id."""

    async def list_id(self) -> str:
        return str((await self.new_list())["id"])

    async def status_of(self, contact_id: str) -> str:
        response = await self.call("GET", f"/contacts/{contact_id}")
        assert response.status_code == 200, response.text
        return str(response.json()["status"])


@pytest.fixture
def account(gateway: httpx.AsyncClient, mint_token: TokenMaker) -> Account:
    return Account(gateway, mint_token)


@pytest.fixture
async def internal(platform: Stack):
    """A client of the contacts service itself, as another service calls it."""
    async with httpx.AsyncClient(
        base_url=platform.url("contacts"),
        headers={"X-Internal-Token": platform.secrets["INTERNAL_TOKEN"]},
        timeout=30,
    ) as client:
        yield client


@pytest.fixture
def signer(platform: Stack) -> LinkSigner:
    return LinkSigner.from_spec(platform.secrets["LINK_SIGNING_KEYS"])


async def recipients(
    internal: httpx.AsyncClient, account: Account, limit: int = 1000, **audience: Any
) -> list[dict[str, Any]]:
    """Every recipient of the audience, page by page."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        body = {
            "account_id": str(account.id),
            "list_ids": audience.get("list_ids", []),
            "contact_ids": audience.get("contact_ids", []),
            "after": after,
            "limit": limit,
        }
        response = await internal.post("/internal/recipients", json=body)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        found += page["items"]
        after = page["next_cursor"]
        if after is None:
            return found


async def published(
    stack: Stack, topic: str, keep: Callable[[Any], bool], *, at_least: int, timeout: float = 30
) -> list[Any]:
    """Events on `topic` that `keep` accepts, read from the beginning until `at_least` are
    found (or `timeout`), then to the end of the topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        deadline = time.monotonic() + timeout
        while True:
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            found = []
            while any([await consumer.position(tp) < end[tp] for tp in partitions]):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        data = decode(record.value).data
                        if keep(data):
                            found.append(data)
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


async def publish(stack: Stack, data: EventData, account_id: uuid.UUID | None) -> Envelope[Any]:
    envelope = Envelope.wrap(data, account_id=account_id)
    await publish_envelope(stack, envelope)
    return envelope


async def publish_envelope(stack: Stack, envelope: Envelope[Any]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        key = envelope.data.partition_key()
        await producer.send_and_wait(
            envelope.topic, envelope.to_bytes(), key=key.encode() if key else None
        )
    finally:
        await producer.stop()


async def eventually(check: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def suppressed_event(email: str) -> Callable[[Any], bool]:
    return lambda data: isinstance(data, ContactSuppressed) and data.email == email


# -- unsubscribe ----------------------------------------------------------------------------------


async def test_one_click_unsubscribe_excludes_the_contact_from_the_next_send(
    account: Account, internal: httpx.AsyncClient, signer: LinkSigner, platform: Stack
):
    the_list = await account.list_id()
    email = f"o'brien&co-{uuid.uuid4().hex[:8]}@example.com"
    leaving = await account.contact(email, list_ids=[the_list])
    staying = await account.contact(list_ids=[the_list])
    before = await recipients(internal, account, list_ids=[the_list])
    assert [r["contact_id"] for r in before] == [leaving["id"], staying["id"]]

    email_id = uuid.uuid4()
    token = signer.sign("unsubscribe", UnsubscribeToken(a=account.id, r=email, e=email_id))
    page = await account.gateway.get(f"/unsubscribe/{token}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "o&#x27;brien&amp;co-" in page.text
    assert "o'brien" not in page.text
    assert "method=post" in page.text
    assert await account.status_of(leaving["id"]) == "active"  # opening the page changes nothing

    for _ in range(2):  # a repeat is harmless
        response = await account.gateway.post(
            f"/unsubscribe/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"unsubscribed": True, "email": email}
    assert await account.status_of(leaving["id"]) == "unsubscribed"
    after = await recipients(internal, account, list_ids=[the_list])
    assert [r["contact_id"] for r in after] == [staying["id"]]
    direct = await recipients(internal, account, contact_ids=[leaving["id"]])
    assert direct == []

    [event] = await published(platform, "contact.suppressed", suppressed_event(email), at_least=1)
    assert event.reason == "unsubscribed"
    assert event.contact_id == uuid.UUID(leaving["id"])
    assert event.email_id == email_id

    browser = await account.gateway.post(f"/unsubscribe/{token}", headers={"Accept": "text/html"})
    assert browser.status_code == 200
    assert "You are unsubscribed" in browser.text
    page = await account.gateway.get(f"/unsubscribe/{token}")
    assert "You are unsubscribed" in page.text


async def test_an_address_that_folds_differently_in_python_is_still_unsubscribed(
    account: Account, signer: LinkSigner
):
    # Python lower-cases a final capital sigma to U+03C2, PostgreSQL's lower() to U+03C3:
    # the contact must be found by the address it was stored under all the same.
    email = f"{uuid.uuid4().hex[:8]}ΟΔΥΣΣΕΑΣ@example.com"
    contact = await account.contact(email)
    token = signer.sign("unsubscribe", UnsubscribeToken(a=account.id, r=email, e=uuid.uuid4()))
    response = await account.gateway.post(
        f"/unsubscribe/{token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert await account.status_of(contact["id"]) == "unsubscribed"

    # And an address unsubscribed before it was a contact is added as unsubscribed.
    later = f"{uuid.uuid4().hex[:8]}ΟΔΥΣΣΕΑΣ@example.com"
    token = signer.sign("unsubscribe", UnsubscribeToken(a=account.id, r=later, e=uuid.uuid4()))
    response = await account.gateway.post(f"/unsubscribe/{token}")
    assert response.status_code == 200, response.text
    assert (await account.contact(later))["status"] == "unsubscribed"


async def test_forged_or_misused_tokens_are_not_found(account: Account, signer: LinkSigner):
    contact = await account.contact()
    token = signer.sign("unsubscribe", UnsubscribeToken(a=account.id, r=contact["email"]))
    payload, kid, mac = token.split(".")
    other = signer.sign("unsubscribe", UnsubscribeToken(a=uuid.uuid4(), r=contact["email"]))
    click = signer.sign(
        "click",
        ClickToken(m="m", e=uuid.uuid4(), a=account.id, i=0, u="https://example.com"),
    )
    for bad in [
        f"{payload}.{kid}.{mac[:-2]}AA",
        f"{other.split('.')[0]}.{kid}.{mac}",
        click,
        "nothing",
        "a.b.c",
    ]:
        response = await account.gateway.post(f"/unsubscribe/{bad}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
        page = await account.gateway.get(f"/unsubscribe/{bad}")
        assert page.status_code == 404
        assert "does not work" in page.text
    assert await account.status_of(contact["id"]) == "active"


async def test_an_address_that_is_no_contact_can_unsubscribe_too(
    account: Account, internal: httpx.AsyncClient, signer: LinkSigner
):
    address = f"Literal-{uuid.uuid4().hex[:8]}@Example.com"
    token = signer.sign("unsubscribe", UnsubscribeToken(a=account.id, r=address))
    response = await account.gateway.post(f"/unsubscribe/{token}", data={})
    assert response.status_code == 200, response.text
    normalised = address.rsplit("@", 1)[0] + "@example.com"
    active = await account.contact()
    answer = await internal.post(
        "/internal/suppressed",
        json={"account_id": str(account.id), "emails": [address.upper(), active["email"]]},
    )
    assert answer.json() == {"suppressed": [address.upper().rsplit("@", 1)[0] + "@example.com"]}
    # Added later as a contact, the address is born suppressed.
    contact = await account.contact(normalised)
    assert contact["status"] == "unsubscribed"


# -- events ---------------------------------------------------------------------------------------


async def test_bounces_and_complaints_suppress_and_say_so(
    account: Account, internal: httpx.AsyncClient, platform: Stack
):
    hard = await account.contact()
    soft = await account.contact()
    complaining = await account.contact()
    email_id = uuid.uuid4()
    bounce = EmailBounced(
        email_id=email_id,
        message_id="<m1@example.com>",
        recipient=hard["email"].upper(),
        hard=True,
        source="smtp",
    )
    envelope = await publish(platform, bounce, account.id)
    await publish_envelope(platform, envelope)  # delivered twice: handled once
    for _ in range(2):
        await publish(
            platform,
            EmailBounced(
                email_id=email_id,
                message_id=None,
                recipient=soft["email"],
                hard=False,
                source="ses",
            ),
            account.id,
        )
    await publish(
        platform,
        EmailComplained(
            email_id=email_id, message_id=None, recipient=complaining["email"], source="sendgrid"
        ),
        account.id,
    )
    # An event without an account cannot be attributed: it is ignored, not crashed on.
    stray = EmailBounced(
        email_id=None, message_id=None, recipient=soft["email"], hard=True, source="smtp"
    )
    await publish(platform, stray, None)

    async def settled() -> bool:
        return (
            await account.status_of(hard["id"]),
            await account.status_of(complaining["id"]),
        ) == (
            "bounced",
            "complained",
        )

    await eventually(settled)

    async def counted() -> bool:
        answer = await account.call("GET", f"/contacts/{soft['id']}")
        return bool(answer.json()["soft_bounces"] == 2)

    await eventually(counted)
    assert await account.status_of(soft["id"]) == "active"
    everyone = [hard["id"], soft["id"], complaining["id"]]
    assert [r["contact_id"] for r in await recipients(internal, account, contact_ids=everyone)] == [
        soft["id"]
    ]
    events = await published(
        platform,
        "contact.suppressed",
        lambda d: (
            isinstance(d, ContactSuppressed)
            and d.email in (hard["email"], complaining["email"], soft["email"])
        ),
        at_least=2,
    )
    assert sorted((e.email, e.reason) for e in events) == sorted(
        [(hard["email"], "bounced"), (complaining["email"], "complained")]
    )


# -- internal endpoints ---------------------------------------------------------------------------


async def test_recipients_merge_lists_and_page_stably(
    account: Account, internal: httpx.AsyncClient, gateway: httpx.AsyncClient, mint_token
):
    first, second = await account.list_id(), await account.list_id()
    people = [
        await account.contact(
            first_name=f"P{i}",
            attributes={"n": i},
            list_ids=[first, second][: 1 + i % 2],
        )
        for i in range(7)
    ]
    outsider = await account.contact()
    gone = await account.contact(list_ids=[first])
    await account.call("PATCH", f"/contacts/{gone['id']}", json={"status": "unsubscribed"})
    stranger = Account(gateway, mint_token)
    their_list = await stranger.list_id()
    await stranger.contact(list_ids=[their_list])

    audience: dict[str, Any] = {
        "list_ids": [first, second, their_list, str(uuid.uuid4())],
        "contact_ids": [outsider["id"], people[0]["id"]],
    }
    for limit in (1, 2, 3, 1000):
        found = await recipients(internal, account, limit=limit, **audience)
        assert [r["contact_id"] for r in found] == [p["id"] for p in [*people, outsider]]
    one = found[3]
    assert one == {
        "email": people[3]["email"],
        "contact_id": people[3]["id"],
        "first_name": "P3",
        "last_name": None,
        "attributes": {"n": 3},
    }
    nothing = await recipients(internal, stranger, **audience)
    assert len(nothing) == 1  # only the stranger's own list counts for the stranger

    # Attributes go out as the database keeps them: every JSON type, nested, any script.
    rich = {
        "city": "Zürich 東京",
        "score": 1.5,
        "seats": 10**15,
        "vip": True,
        "none": None,
        "tags": ["a", '"q" <b>\\'],
        "nested": {"k": {"deep": []}},
    }
    rich_list = await account.list_id()
    made = await account.contact(first_name="Ünal", attributes=rich, list_ids=[rich_list])
    answer = await internal.post(
        "/internal/recipients", json={"account_id": str(account.id), "list_ids": [rich_list]}
    )
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "items": [
            {
                "email": made["email"],
                "contact_id": made["id"],
                "first_name": "Ünal",
                "last_name": None,
                "attributes": rich,
            }
        ],
        "next_cursor": None,
    }
    empty = await internal.post("/internal/recipients", json={"account_id": str(account.id)})
    assert empty.json() == {"items": [], "next_cursor": None}

    bad = await internal.post(
        "/internal/recipients", json={"account_id": str(account.id), "after": "zzz"}
    )
    assert bad.status_code == 422
    too_big = await internal.post(
        "/internal/recipients", json={"account_id": str(account.id), "limit": 5001}
    )
    assert too_big.status_code == 422
    unauthorised = await internal.post(
        "/internal/recipients",
        json={"account_id": str(account.id)},
        headers={"X-Internal-Token": "wrong"},
    )
    assert unauthorised.status_code == 403


async def test_suppressed_names_what_must_not_be_mailed(
    account: Account, internal: httpx.AsyncClient, platform: Stack
):
    active = await account.contact()
    bounced = await account.contact()
    await publish(
        platform,
        EmailBounced(
            email_id=None, message_id=None, recipient=bounced["email"], hard=True, source="smtp"
        ),
        account.id,
    )

    async def bounced_now() -> bool:
        return await account.status_of(bounced["id"]) == "bounced"

    await eventually(bounced_now)
    unknown = f"nobody-{uuid.uuid4().hex[:6]}@example.com"
    answer = await internal.post(
        "/internal/suppressed",
        json={
            "account_id": str(account.id),
            "emails": [active["email"], bounced["email"].upper(), unknown, "not an address"],
        },
    )
    assert answer.status_code == 200, answer.text
    local = bounced["email"].split("@")[0].upper()
    assert answer.json() == {"suppressed": [f"{local}@example.com"]}
    elsewhere = await internal.post(
        "/internal/suppressed", json={"account_id": str(uuid.uuid4()), "emails": [bounced["email"]]}
    )
    assert elsewhere.json() == {"suppressed": []}
    too_many = await internal.post(
        "/internal/suppressed", json={"account_id": str(account.id), "emails": ["a"] * 5001}
    )
    assert too_many.status_code == 422


# -- a crash during an import ---------------------------------------------------------------------


async def test_an_import_cut_short_by_a_crash_fails_and_changes_nothing(
    account: Account, platform: Stack
):
    tag = uuid.uuid4().hex[:8]
    lines = ["email,first_name,plan"] + [
        f"crash{i}-{tag}@example.com,N{i},free" for i in range(400_000)
    ]
    response = await account.call(
        "POST",
        "/contacts/import",
        files={"file": ("big.csv", "\n".join(lines).encode(), "text/csv")},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    async def running() -> bool:
        job = await account.call("GET", f"/contacts/import/{job_id}")
        assert job.json()["status"] != "succeeded", "finished before it could be interrupted"
        return bool(job.json()["status"] == "running")

    await eventually(running)
    await platform.stop_service("contacts", signal.SIGKILL)
    await platform.start_service("contacts")
    await platform.wait_ready(60, services=["contacts"])

    async def failed() -> bool:
        job = await account.call("GET", f"/contacts/import/{job_id}")
        return bool(job.status_code == 200 and job.json()["status"] == "failed")

    await eventually(failed, timeout=60)
    job = (await account.call("GET", f"/contacts/import/{job_id}")).json()
    assert "upload the file again" in job["failure_reason"]
    assert (job["created"], job["updated"]) == (0, 0)
    page = await account.call("GET", "/contacts", params={"q": f"crash0-{tag}"})
    assert page.json()["items"] == []
