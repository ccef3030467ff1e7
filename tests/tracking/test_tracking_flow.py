"""Tracking through the gateway: delivery outcomes, opens and clicks, machine activity, the
per-email view, reports, and tenant isolation."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import httpx

from herald.devinfra.stack import Stack
from herald.events.auth import UserChanged
from herald.events.contacts import ContactSuppressed
from herald.events.scheduler import EmailFannedOut
from herald.links import ClickToken, LinkSigner, OpenToken
from tests.conftest import TokenMaker
from tests.tracking.tracking_helpers import (
    Account,
    Email,
    click_url,
    counts_when,
    dispatched,
    eventually,
    open_url,
    publish,
    scheduled,
    signer,
    tracking,
    wrap,
)

# The gateway keeps /reports answers for a few seconds; these tests always want the service.
NO_CACHE = {"Cache-Control": "no-cache"}
BROWSER = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/17.5 Safari/605.1.15"
)


async def test_outcomes_count_once_per_recipient(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    a, b, c = "a@example.com", "b@example.com", "c@example.com"
    first_a = dispatched(email, a)
    await publish(
        platform,
        first_a,
        dispatched(email, b, "deferred", attempt=1, smtp_code=421),
        dispatched(email, b, "deferred", attempt=2, smtp_code=421),
        dispatched(email, c, "failed", smtp_code=550),
        wrap(
            EmailFannedOut(email_id=email.id, revision=1, total_recipients=4, batches=1),
            email.account.id,
        ),
    )
    counts = await counts_when(gateway, email, lambda c: c["deferred"] == 1 and c["failed"] == 1)
    assert (counts["sent"], counts["deferred"], counts["failed"], counts["queued"]) == (1, 1, 1, 1)

    # The same outcomes again under new event ids, a stale deferral, then b's final answer.
    await publish(
        platform,
        dispatched(email, a),
        dispatched(email, c, "failed", smtp_code=550),
        dispatched(email, b, "sent", attempt=3),
        dispatched(email, b, "deferred", attempt=1, smtp_code=421),
    )
    counts = await counts_when(gateway, email, lambda c: c["sent"] == 2)
    assert {k: counts[k] for k in ("sent", "deferred", "failed", "delivered", "queued")} == {
        "sent": 2,
        "deferred": 0,
        "failed": 1,
        "delivered": 2,
        "queued": 1,
    }
    body = await tracking(gateway, email)
    assert body["rates"]["delivery_rate"] == round(2 / 3, 4)
    people = {r["recipient"]: r for r in body["recipients"]["items"]}
    assert set(people) == {a, b, c}
    assert (people[b]["status"], people[b]["attempts"]) == ("sent", 3)
    assert people[c]["status"] == "failed"
    assert people[c]["smtp_code"] == 550
    assert people[a]["sent_at"] == first_a.occurred_at.isoformat().replace("+00:00", "Z")


async def test_opens_and_clicks_through_the_gateway(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    reader = "reader@example.com"
    await publish(platform, dispatched(email, reader))
    await counts_when(gateway, email, lambda c: c["sent"] == 1)

    pixel = await gateway.get(open_url(platform, email, reader), headers={"User-Agent": BROWSER})
    assert pixel.status_code == 200
    assert pixel.headers["content-type"] == "image/gif"
    assert pixel.content.startswith(b"GIF89a")
    assert "no-store" in pixel.headers["cache-control"]
    await gateway.get(open_url(platform, email, reader), headers={"User-Agent": BROWSER})

    target = "https://shop.example.com/spring?utm_source=herald&x=1"
    click = await gateway.get(
        click_url(platform, email, reader, 0, target), headers={"User-Agent": BROWSER}
    )
    assert click.status_code == 302
    assert click.headers["location"] == target
    assert click.headers["referrer-policy"] == "no-referrer"

    counts = await counts_when(gateway, email, lambda c: c["clicks"] == 1 and c["opens"] == 2)
    assert {
        k: counts[k] for k in ("opens", "human_opens", "unique_opens", "unique_human_opens")
    } == {
        "opens": 2,
        "human_opens": 2,
        "unique_opens": 1,
        "unique_human_opens": 1,
    }
    assert (counts["clicks"], counts["unique_clicks"], counts["unique_human_clicks"]) == (1, 1, 1)
    body = await tracking(gateway, email)
    assert body["links"] == [
        {
            "link_index": 0,
            "url": target,
            "clicks": 1,
            "human_clicks": 1,
            "unique_clicks": 1,
            "unique_human_clicks": 1,
        }
    ]
    assert body["rates"]["open_rate"] == 1.0
    assert body["rates"]["click_to_open_rate"] == 1.0
    [person] = body["recipients"]["items"]
    assert person["opens"] == 2
    assert person["first_open_at"] is not None
    assert person["first_human_click_at"] is not None


async def test_forged_and_misused_tokens_get_404_and_never_redirect(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    genuine = click_url(platform, email, "x@example.com", 0, "https://example.com/")
    payload, kid, mac = genuine.removeprefix("/t/c/").split(".")
    evil = ClickToken(m="m", e=email.id, a=email.account.id, i=0, u="https://evil.example/")
    forged_key = LinkSigner.from_spec("k1:someone-elses-key").sign("click", evil)
    altered = signer(platform).sign("click", evil).split(".")[0] + f".{kid}.{mac}"
    open_token = open_url(platform, email, "x@example.com").removeprefix("/t/o/")
    script = signer(platform).sign(
        "click", ClickToken(m="m", e=email.id, a=email.account.id, i=0, u="javascript:alert(1)")
    )
    for path in (
        f"/t/c/{forged_key}",
        f"/t/c/{altered}",
        f"/t/c/{payload}.{kid}.{mac[:5]}{'B' if mac[5] == 'A' else 'A'}{mac[6:]}",
        f"/t/c/{open_token}",
        f"/t/c/{script}",
        "/t/c/not-a-token",
        f"/t/o/{genuine.removeprefix('/t/c/')}",
        f"/t/o/{open_token[:-3]}abc",
        # Non-ASCII where the MAC goes (percent-encoded in the URL): a 404, not a 500.
        f"/t/c/{payload}.{kid}.%C3%A9{mac[2:]}",
        f"/t/o/{open_token[:-3]}%E2%82%AC",
    ):
        response = await gateway.get(path)
        assert response.status_code == 404, path
        assert "location" not in response.headers
        assert response.json()["error"]["code"] == "not_found"


async def test_machine_activity_is_flagged_and_reported_beside_human(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    person, proxied, scanned, fresh = (f"{n}@example.com" for n in ("p", "q", "s", "f"))
    await publish(
        platform,
        *(dispatched(email, r) for r in (person, proxied, scanned)),
        dispatched(email, fresh, ago=timedelta(0)),
    )
    await counts_when(gateway, email, lambda c: c["sent"] == 4)
    gmail = (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    )
    opens = [(person, BROWSER), (proxied, gmail), (proxied, "Mozilla/5.0"), (scanned, None)]
    for recipient, agent in opens:
        headers = {"User-Agent": agent} if agent else {"User-Agent": ""}
        assert (await gateway.get(open_url(platform, email, recipient), headers=headers)).is_success
    clicks = [
        (person, 0, BROWSER),
        (fresh, 0, BROWSER),  # within seconds of delivery
        (scanned, 0, "Mozilla/5.0 (compatible; Barracuda Sentinel)"),
        (proxied, 1, BROWSER),  # two different links at once: a burst
        (proxied, 2, BROWSER),
    ]
    for recipient, index, agent in clicks:
        url = click_url(platform, email, recipient, index, f"https://example.com/{index}")
        assert (await gateway.get(url, headers={"User-Agent": agent})).status_code == 302

    counts = await counts_when(gateway, email, lambda c: c["clicks"] == 5)
    assert (counts["opens"], counts["human_opens"]) == (4, 1)
    assert (counts["unique_opens"], counts["unique_human_opens"]) == (4, 1)
    assert (counts["clicks"], counts["human_clicks"]) == (5, 1)
    assert (counts["unique_clicks"], counts["unique_human_clicks"]) == (4, 1)
    body = await tracking(gateway, email)
    assert body["rates"]["open_rate"] == 1.0
    assert body["rates"]["human_open_rate"] == 0.25
    by_link = {link["link_index"]: link for link in body["links"]}
    assert (by_link[0]["clicks"], by_link[0]["human_clicks"]) == (3, 1)
    assert by_link[1]["human_clicks"] == by_link[2]["human_clicks"] == 0


async def test_recipients_are_listed_in_pages(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    addresses = sorted(f"r{n:02d}@example.com" for n in range(7))
    await publish(platform, *(dispatched(email, r) for r in addresses))
    await counts_when(gateway, email, lambda c: c["sent"] == 7)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await tracking(gateway, email, **params))["recipients"]
        seen += [r["recipient"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == addresses
    bad = await gateway.get(
        f"/tracking/{email.id}", headers=email.account.headers, params={"cursor": "%%%"}
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "cursor"


async def test_reports_in_the_account_timezone_with_tables_filters_and_csv(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    account = Account.new(mint_token)
    change = UserChanged(
        user_id=account.id,
        email=f"{account.id.hex}@example.com",
        timezone="Asia/Tokyo",
        status="active",
        role="user",
    )
    news, promo = Email(account), Email(account)
    await publish(
        platform,
        wrap(change, account.id),
        *(dispatched(news, f"n{n}@example.com") for n in range(4)),
        *(dispatched(promo, f"p{n}@example.com") for n in range(2)),
    )
    await counts_when(gateway, news, lambda c: c["sent"] == 4)
    await counts_when(gateway, promo, lambda c: c["sent"] == 2)
    # Tags come with the campaign service's hand-over (due far ahead, so nothing is sent).
    await publish(platform, scheduled(news, "Spring news", ["newsletter", "spring"]))
    for n in range(2):
        await gateway.get(
            open_url(platform, news, f"n{n}@example.com"), headers={"User-Agent": BROWSER}
        )
    url = click_url(platform, news, "n0@example.com", 0, "https://example.com/a")
    await gateway.get(url, headers={"User-Agent": BROWSER})
    await counts_when(gateway, news, lambda c: c["clicks"] == 1 and c["opens"] == 2)

    async def report(**params: Any) -> dict[str, Any]:
        response = await gateway.get("/reports", headers=account.headers | NO_CACHE, params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    body = await eventually(
        lambda: report(),
        lambda b: (
            b["timezone"] == "Asia/Tokyo"
            and any(e["subject"] == "Spring news" for e in b["emails"])
        ),
    )
    assert body["timezone"] == "Asia/Tokyo"
    assert body["interval"] == "day"
    totals = body["totals"]
    assert (totals["sent"], totals["delivered"], totals["unique_opens"], totals["clicks"]) == (
        6,
        6,
        2,
        1,
    )
    assert body["rates"]["open_rate"] == round(2 / 6, 4)
    assert body["rates"]["human_click_to_open_rate"] == 0.5
    assert len(body["series"]) == 30
    today = datetime.now(ZoneInfo("Asia/Tokyo")).date().isoformat()
    assert body["series"][-1]["bucket"] == today
    assert sum(point["sent"] for point in body["series"]) == 6
    assert {e["email_id"]: e["sent"] for e in body["emails"]} == {str(news.id): 4, str(promo.id): 2}
    assert body["top_links"][0]["url"] == "https://example.com/a"

    tagged = await report(tag="newsletter")
    assert [e["email_id"] for e in tagged["emails"]] == [str(news.id)]
    assert tagged["totals"]["sent"] == 4
    assert (await report(tag="no-such-tag"))["totals"]["sent"] == 0
    one = await report(email_id=str(promo.id))
    assert (one["totals"]["sent"], one["top_links"]) == (2, [])

    hourly = await report(**{"from": today, "to": today, "interval": "hour"})
    assert len(hourly["series"]) == 24
    assert hourly["series"][0]["bucket"].endswith("T00:00:00+09:00")
    assert hourly["totals"]["sent"] == 6

    exported = await gateway.get(
        "/reports", headers=account.headers | NO_CACHE, params={"format": "csv", "tag": "spring"}
    )
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["email_id"], r["subject"], r["sent"], r["tags"]) for r in rows] == [
        (str(news.id), "Spring news", "4", "newsletter;spring")
    ]
    series_csv = await gateway.get(
        "/reports", headers=account.headers | NO_CACHE, params={"format": "csv", "table": "series"}
    )
    assert series_csv.text.splitlines()[0].startswith("bucket,sent,failed")


async def test_each_account_sees_only_its_own_emails(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    mine, theirs = Email(Account.new(mint_token)), Email(Account.new(mint_token))
    await publish(platform, dispatched(mine, "m@example.com"), dispatched(theirs, "t@example.com"))
    await counts_when(gateway, theirs, lambda c: c["sent"] == 1)
    await counts_when(gateway, mine, lambda c: c["sent"] == 1)
    peek = await gateway.get(f"/tracking/{theirs.id}", headers=mine.account.headers)
    assert peek.status_code == 404
    report = await gateway.get(
        "/reports", headers=mine.account.headers | NO_CACHE, params={"email_id": str(theirs.id)}
    )
    assert report.status_code == 404
    own = (await gateway.get("/reports", headers=mine.account.headers | NO_CACHE)).json()
    assert [e["email_id"] for e in own["emails"]] == [str(mine.id)]
    assert (
        await gateway.get(f"/tracking/{uuid.uuid4()}", headers=mine.account.headers)
    ).status_code == 404
    assert (await gateway.get(f"/tracking/{mine.id}")).status_code == 401
    send_only = {"Authorization": f"Bearer {mint_token(mine.account.id, scope='send')}"}
    refused = await gateway.get("/reports", headers=send_only | NO_CACHE)
    assert refused.status_code == 403


async def test_report_parameters_are_checked(gateway: httpx.AsyncClient, mint_token: TokenMaker):
    account = Account.new(mint_token)
    cases = [
        ({"from": "2026-03-10", "to": "2026-03-01"}, "from"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-01-01", "to": "2026-03-01", "interval": "hour"}, "interval"),
        ({"interval": "week"}, "interval"),
        ({"format": "xml"}, "format"),
        ({"email_id": "nope"}, "email_id"),
        ({"limit": "0"}, "limit"),
    ]
    for params, field in cases:
        response = await gateway.get("/reports", headers=account.headers | NO_CACHE, params=params)
        assert response.status_code == 422, (params, response.text)
        assert [d["field"] for d in response.json()["error"]["details"]] == [field], params


async def test_unsubscribes_count_once_per_recipient(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    leaver = "leaver@example.com"
    await publish(platform, dispatched(email, leaver), dispatched(email, "stays@example.com"))
    await counts_when(gateway, email, lambda c: c["sent"] == 2)

    def suppressed(reason: Literal["unsubscribed", "bounced"]) -> Any:
        data = ContactSuppressed(
            contact_id=None, email=leaver.upper(), reason=reason, email_id=email.id
        )
        return wrap(data, email.account.id)

    await publish(
        platform, suppressed("unsubscribed"), suppressed("unsubscribed"), suppressed("bounced")
    )
    counts = await counts_when(gateway, email, lambda c: c["unsubscribed"] >= 1)
    assert counts["unsubscribed"] == 1
    body = await tracking(gateway, email)
    assert body["rates"]["unsubscribe_rate"] == 0.5
    people = {r["recipient"]: r for r in body["recipients"]["items"]}
    assert people[leaver]["unsubscribed_at"] is not None
    assert people["stays@example.com"]["unsubscribed_at"] is None


async def test_an_open_before_its_outcome_is_attributed_when_the_outcome_arrives(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    early = "early@example.com"
    token = signer(platform).sign(
        "open", OpenToken(m=email.message_id(early), e=email.id, a=email.account.id)
    )
    assert (await gateway.get(f"/t/o/{token}", headers={"User-Agent": BROWSER})).is_success
    counts = await counts_when(gateway, email, lambda c: c["opens"] == 1)
    assert (counts["sent"], counts["unique_opens"]) == (0, 1)
    assert (await tracking(gateway, email))["recipients"]["items"] == []

    await publish(platform, dispatched(email, early, ago=timedelta(seconds=30)))
    counts = await counts_when(gateway, email, lambda c: c["sent"] == 1)
    assert (counts["opens"], counts["unique_opens"], counts["delivered"]) == (1, 1, 1)
    [person] = (await tracking(gateway, email))["recipients"]["items"]
    assert (person["recipient"], person["opens"]) == (early, 1)
    assert datetime.fromisoformat(person["first_open_at"]) <= datetime.now(UTC)
