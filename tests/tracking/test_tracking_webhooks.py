"""Provider webhooks: SES through SNS (signatures, the subscription handshake, bounces and
complaints) and SendGrid's Event Webhook (ECDSA-signed and unsigned)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from herald.devinfra.stack import Stack
from herald.events.tracking import EmailBounced, EmailComplained
from tests.conftest import TokenMaker
from tests.tracking.tracking_fakes import (
    TOPIC,
    FakeSns,
    fake_sns,
    sendgrid_headers,
    sendgrid_keys,
    settings,
    tracking_in_process,
)
from tests.tracking.tracking_helpers import (
    Account,
    Email,
    counts_when,
    dispatched,
    eventually,
    publish,
    read_events,
    tracking,
)


@pytest.fixture(scope="module")
async def sns() -> AsyncIterator[FakeSns]:
    async with fake_sns() as server:
        yield server


@pytest.fixture(scope="module")
def sendgrid_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    return sendgrid_keys()


@pytest.fixture(scope="module")
async def service(
    platform: Stack, sns: FakeSns, sendgrid_key: tuple[ec.EllipticCurvePrivateKey, str]
) -> AsyncIterator[httpx.AsyncClient]:
    """A tracking service that trusts the fake SNS and checks SendGrid signatures."""
    config = settings(
        platform,
        sns_cert_hosts=r"127\.0\.0\.1",
        sns_ca_file=str(sns.ca_file),
        ses_topic_arns=f"{TOPIC},arn:aws:sns:eu-west-1:123456789012:other",
        sendgrid_public_key=sendgrid_key[1],
    )
    async with tracking_in_process(config) as client:
        yield client


def ses_mail(email: Email, recipient: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "timestamp": now,
        "source": "news@herald.test",
        "messageId": f"0100018e{uuid.uuid4().hex}-000000",
        "destination": [recipient],
        "headersTruncated": False,
        "headers": [
            {"name": "From", "value": "News <news@herald.test>"},
            {"name": "To", "value": recipient},
            {"name": "Message-ID", "value": email.header_id(recipient)},
        ],
        "commonHeaders": {"from": ["news@herald.test"], "to": [recipient], "subject": "Hi"},
    }


def ses_bounce(email: Email, recipient: str, kind: str = "Permanent") -> dict[str, Any]:
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": kind,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": recipient,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
            ],
            "timestamp": datetime.now(UTC).isoformat(),
            "feedbackId": uuid.uuid4().hex,
        },
        "mail": ses_mail(email, recipient),
    }


def ses_complaint(email: Email, recipient: str) -> dict[str, Any]:
    return {
        "notificationType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": recipient}],
            "timestamp": datetime.now(UTC).isoformat(),
            "feedbackId": uuid.uuid4().hex,
            "complaintFeedbackType": "abuse",
        },
        "mail": ses_mail(email, recipient),
    }


def ses_delivery(email: Email, recipient: str) -> dict[str, Any]:
    return {
        "notificationType": "Delivery",
        "delivery": {
            "timestamp": datetime.now(UTC).isoformat(),
            "recipients": [recipient],
            "processingTimeMillis": 546,
            "smtpResponse": "250 ok",
        },
        "mail": ses_mail(email, recipient),
    }


async def post_sns(client: httpx.AsyncClient, message: dict[str, Any]) -> httpx.Response:
    # SNS posts JSON as text/plain.
    return await client.post(
        "/webhooks/ses",
        content=orjson.dumps(message),
        headers={"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "x"},
    )


async def test_the_sns_subscription_is_confirmed_at_its_subscribe_url(
    service: httpx.AsyncClient, sns: FakeSns
):
    token = uuid.uuid4().hex
    fields = {
        "Type": "SubscriptionConfirmation",
        "MessageId": str(uuid.uuid4()),
        "Token": token,
        "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe to the topic.",
        "SubscribeURL": f"{sns.base}/confirm?Action=ConfirmSubscription&Token={token}",
        "Timestamp": datetime.now(UTC).isoformat(),
    }
    response = await post_sns(service, sns.sign(fields, version="1"))
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "confirmed"}
    assert sns.confirmations == [token]

    # Signed by SNS, but pointing somewhere else: never visited.
    elsewhere = fields | {"SubscribeURL": "https://169.254.169.254/latest/meta-data"}
    refused = await post_sns(service, sns.sign(elsewhere))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "subscribe_url"
    assert sns.confirmations == [token]


async def test_forged_or_foreign_sns_messages_are_refused(service: httpx.AsyncClient, sns: FakeSns):
    email = Email(Account(uuid.uuid4(), {}))
    genuine = sns.notification(ses_bounce(email, "x@example.com"))
    altered = dict(genuine, Message=genuine["Message"].replace("Permanent", "Transient"))
    foreign_cert = dict(genuine, SigningCertURL="https://evil.example/cert.pem")
    unsigned = {k: v for k, v in genuine.items() if k != "Signature"}
    cases = [
        (altered, 403, "signature"),
        (foreign_cert, 403, "certificate_host"),
        (dict(genuine, SignatureVersion="3"), 403, "signature"),
        (unsigned, 403, "signature"),
        (
            sns.notification(ses_bounce(email, "x@example.com"), topic="arn:aws:sns:x:1:y"),
            403,
            "topic",
        ),
        (dict(genuine, Type="Surprise"), 400, "unknown_type"),
    ]
    for message, status, code in cases:
        response = await post_sns(service, message)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    garbage = await service.post("/webhooks/ses", content=b"{not json")
    assert garbage.status_code == 400
    too_big = await service.post("/webhooks/ses", content=b"x" * 6_000_000)
    assert too_big.status_code == 413


async def test_ses_bounces_and_complaints_are_counted_and_published(
    platform: Stack,
    service: httpx.AsyncClient,
    sns: FakeSns,
    gateway: httpx.AsyncClient,
    mint_token: TokenMaker,
):
    email = Email(Account.new(mint_token))
    hard, soft, angry = "hard@example.com", "soft@example.com", "angry@example.com"
    await publish(platform, *(dispatched(email, r) for r in (hard, soft, angry)))
    await counts_when(gateway, email, lambda c: c["sent"] == 3)

    bounce = sns.notification(ses_bounce(email, hard))
    for message in (
        bounce,
        sns.notification(ses_bounce(email, soft, "Transient")),
        sns.notification(ses_delivery(email, angry)),
        sns.notification(ses_complaint(email, angry)),
    ):
        response = await post_sns(service, message)
        assert response.status_code == 200, response.text
        assert response.json()["matched"] == 1
    # The same notification again, and the same bounce in a new notification: counted once.
    assert (await post_sns(service, bounce)).json()["duplicate"] == 1
    assert (await post_sns(service, sns.notification(ses_bounce(email, hard)))).is_success

    counts = await counts_when(gateway, email, lambda c: c["complained"] == 1)
    assert {k: counts[k] for k in ("sent", "bounced", "hard_bounced", "complained")} == {
        "sent": 3,
        "bounced": 2,
        "hard_bounced": 1,
        "complained": 1,
    }
    assert (counts["delivered"], counts["confirmed"]) == (1, 1)
    people = {r["recipient"]: r for r in (await tracking(gateway, email))["recipients"]["items"]}
    assert (people[hard]["bounce"], people[soft]["bounce"]) == ("hard", "soft")
    assert people[angry]["complained_at"] is not None
    assert people[angry]["provider_status"] == "complained"

    bounced = await read_events(
        platform, "email.bounced", lambda e: e.data.email_id == email.id, at_least=2
    )
    assert sorted((e.data.recipient, e.data.hard) for e in bounced) == [(hard, True), (soft, False)]
    first: EmailBounced = bounced[0].data
    assert first.source == "ses"
    assert first.message_id == email.message_id(first.recipient).strip("<>")
    assert {e.account_id for e in bounced} == {email.account.id}
    [complaint] = await read_events(
        platform, "email.complained", lambda e: e.data.email_id == email.id
    )
    assert isinstance(complaint.data, EmailComplained)
    assert (complaint.data.recipient, complaint.data.source) == (angry, "ses")


async def test_a_notification_before_the_outcome_waits_for_its_message(
    platform: Stack,
    service: httpx.AsyncClient,
    sns: FakeSns,
    gateway: httpx.AsyncClient,
    mint_token: TokenMaker,
):
    email = Email(Account.new(mint_token))
    early = "early@example.com"
    response = await post_sns(service, sns.notification(ses_bounce(email, early)))
    assert response.json() == {"status": "ok", "events": 1, "unmatched": 1}

    await publish(platform, dispatched(email, early))
    counts = await counts_when(gateway, email, lambda c: c["bounced"] == 1)
    assert (counts["sent"], counts["hard_bounced"], counts["delivered"]) == (1, 1, 0)
    [event] = await read_events(platform, "email.bounced", lambda e: e.data.email_id == email.id)
    assert (event.data.recipient, event.data.hard) == (early, True)


def sendgrid_events(email: Email, recipients: dict[str, str]) -> list[dict[str, Any]]:
    now = int(datetime.now(UTC).timestamp())
    events: list[dict[str, Any]] = []
    for recipient, kind in recipients.items():
        smtp_id = email.header_id(recipient)
        base = {
            "email": recipient,
            "timestamp": now,
            "sg_event_id": uuid.uuid4().hex,
            "sg_message_id": f"{uuid.uuid4().hex[:22]}.filter0001-1-1",
            "category": ["news"],
        }
        if kind == "spamreport":
            # No smtp-id on these: the message is known by SendGrid's id from an earlier event.
            events.append({**base, "event": "processed", "smtp-id": smtp_id})
            events.append({**base, "event": "spamreport", "sg_event_id": uuid.uuid4().hex})
        else:
            events.append({**base, "event": kind, "smtp-id": smtp_id, "type": "bounce"})
    return events


async def test_sendgrid_events_are_verified_and_recorded(
    platform: Stack,
    service: httpx.AsyncClient,
    sendgrid_key: tuple[ec.EllipticCurvePrivateKey, str],
    gateway: httpx.AsyncClient,
    mint_token: TokenMaker,
):
    email = Email(Account.new(mint_token))
    kinds = {
        "ok@example.com": "delivered",
        "gone@example.com": "bounce",
        "spam@example.com": "spamreport",
        "slow@example.com": "deferred",
    }
    await publish(platform, *(dispatched(email, r) for r in kinds))
    await counts_when(gateway, email, lambda c: c["sent"] == 4)
    body = orjson.dumps(
        [*sendgrid_events(email, kinds), {"event": "open", "email": "nobody@example.com"}]
    )
    key, _ = sendgrid_key

    forged = sendgrid_headers(ec.generate_private_key(ec.SECP256R1()), body)
    assert (
        await service.post("/webhooks/sendgrid", content=body, headers=forged)
    ).status_code == 403
    unsigned = await service.post("/webhooks/sendgrid", content=body)
    assert unsigned.status_code == 403
    tampered = await service.post(
        "/webhooks/sendgrid", content=body + b" ", headers=sendgrid_headers(key, body)
    )
    assert tampered.status_code == 403

    response = await service.post(
        "/webhooks/sendgrid", content=body, headers=sendgrid_headers(key, body)
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "events": 6, "matched": 5, "unmatched": 1}
    again = await service.post(
        "/webhooks/sendgrid", content=body, headers=sendgrid_headers(key, body)
    )
    assert again.json()["duplicate"] == 6

    counts = await counts_when(gateway, email, lambda c: c["complained"] == 1)
    assert {k: counts[k] for k in ("confirmed", "bounced", "hard_bounced", "complained")} == {
        "confirmed": 1,
        "bounced": 1,
        "hard_bounced": 1,
        "complained": 1,
    }
    people = {r["recipient"]: r for r in (await tracking(gateway, email))["recipients"]["items"]}
    assert people["slow@example.com"]["provider_status"] == "deferred"
    [bounce] = await read_events(platform, "email.bounced", lambda e: e.data.email_id == email.id)
    assert (bounce.data.recipient, bounce.data.source, bounce.data.hard) == (
        "gone@example.com",
        "sendgrid",
        True,
    )


async def test_unsigned_sendgrid_posts_pass_the_gateway_when_no_key_is_set(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    await publish(platform, dispatched(email, "blocked@example.com"))
    await counts_when(gateway, email, lambda c: c["sent"] == 1)
    [event] = sendgrid_events(email, {"blocked@example.com": "bounce"})
    event["type"] = "blocked"
    response = await gateway.post("/webhooks/sendgrid", json=[event, "not an event"])
    assert response.status_code == 200, response.text
    assert response.json()["matched"] == 1
    counts = await counts_when(gateway, email, lambda c: c["bounced"] == 1)
    assert counts["hard_bounced"] == 0
    refused = await gateway.post("/webhooks/sendgrid", json={"event": "open"})
    assert refused.status_code == 400


async def test_a_hard_bounce_suppresses_the_address_at_the_contacts_service(
    platform: Stack,
    service: httpx.AsyncClient,
    sns: FakeSns,
    gateway: httpx.AsyncClient,
    mint_token: TokenMaker,
):
    email = Email(Account.new(mint_token))
    gone, full = "gone@example.com", "full@example.com"
    await publish(platform, dispatched(email, gone), dispatched(email, full))
    await counts_when(gateway, email, lambda c: c["sent"] == 2)
    for message in (ses_bounce(email, gone), ses_bounce(email, full, "Transient")):
        assert (await post_sns(service, sns.notification(message))).json()["matched"] == 1

    async def suppressed() -> list[str]:
        async with httpx.AsyncClient(base_url=platform.url("contacts"), timeout=10) as contacts:
            response = await contacts.post(
                "/internal/suppressed",
                json={"account_id": str(email.account.id), "emails": [gone, full]},
                headers={"X-Internal-Token": platform.secrets["INTERNAL_TOKEN"]},
            )
        assert response.status_code == 200, response.text
        found: list[str] = response.json()["suppressed"]
        return found

    assert await eventually(suppressed, lambda found: found == [gone]) == [gone]


async def test_notifications_name_the_dispatchers_messages_by_their_header(
    platform: Stack,
    service: httpx.AsyncClient,
    sns: FakeSns,
    gateway: httpx.AsyncClient,
    mint_token: TokenMaker,
):
    email = Email(Account.new(mint_token), bare_ids=True)
    known, later, spam = "known@example.com", "later@example.com", "spam@example.com"
    await publish(platform, dispatched(email, known), dispatched(email, spam))
    await counts_when(gateway, email, lambda c: c["sent"] == 2)
    for message, outcome in (
        (ses_bounce(email, known), "matched"),
        (ses_bounce(email, later), "unmatched"),
    ):
        assert (await post_sns(service, sns.notification(message))).json()[outcome] == 1
    [event] = sendgrid_events(email, {spam: "bounce"})
    response = await gateway.post("/webhooks/sendgrid", json=[dict(event, event="spamreport")])
    assert response.json()["matched"] == 1
    await publish(platform, dispatched(email, later))
    counts = await counts_when(gateway, email, lambda c: c["bounced"] == 2)
    assert (counts["sent"], counts["hard_bounced"], counts["complained"]) == (3, 2, 1)
