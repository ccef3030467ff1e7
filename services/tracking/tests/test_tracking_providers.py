"""SES and SendGrid payloads (the providers' documented samples) read as our events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tracking.providers import link_key, sendgrid_event, ses_events, ses_message_id

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)

# From the SES developer guide's notification examples, with our Message-ID header.
SES_MAIL: dict[str, Any] = {
    "timestamp": "2016-01-27T14:59:38.237Z",
    "messageId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
    "source": "john@example.com",
    "destination": ["jane@example.com", "mary@example.com", "richard@example.com"],
    "headersTruncated": False,
    "headers": [
        {"name": "From", "value": "John Doe <john@example.com>"},
        {"name": "Message-ID", "value": "<ours-123@herald.example>"},
    ],
    "commonHeaders": {"messageId": "<ours-123@herald.example>", "subject": "Hello"},
}


def test_ses_bounce_with_one_event_per_bounced_recipient():
    notification: dict[str, Any] = {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [
                {"emailAddress": "Jane@Example.com", "diagnosticCode": "smtp; 550 user unknown"},
                {"emailAddress": "richard@example.com", "status": "5.1.1"},
            ],
            "timestamp": "2016-01-27T14:59:38.237Z",
        },
        "mail": SES_MAIL,
    }
    jane, richard = ses_events("sns-1", notification, received_at=NOW)
    assert (jane.kind, jane.hard, jane.recipient) == ("bounce", True, "jane@example.com")
    assert jane.message_id == "ours-123@herald.example"
    assert jane.provider_message_id == SES_MAIL["messageId"]
    assert jane.detail == "smtp; 550 user unknown"
    assert jane.at == datetime(2016, 1, 27, 14, 59, 38, 237000, tzinfo=UTC)
    assert (richard.event_id, richard.detail) == ("sns-1:1", "General")
    transient = dict(notification, bounce=dict(notification["bounce"], bounceType="Transient"))
    assert not ses_events("sns-2", transient, received_at=NOW)[0].hard


def test_ses_complaint_delivery_delay_and_reject():
    complaint = {
        "notificationType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": "richard@example.com"}],
            "timestamp": "2016-01-27T14:59:38.237Z",
            "complaintFeedbackType": "abuse",
        },
        "mail": SES_MAIL,
    }
    [event] = ses_events("c", complaint, received_at=NOW)
    assert (event.kind, event.recipient, event.detail) == (
        "complaint",
        "richard@example.com",
        "abuse",
    )
    delivery = {
        "notificationType": "Delivery",
        "delivery": {"timestamp": "2016-01-27T14:59:38.237Z", "recipients": ["jane@example.com"]},
        "mail": SES_MAIL,
    }
    assert [e.kind for e in ses_events("d", delivery, received_at=NOW)] == ["delivered"]
    delay = {
        "eventType": "DeliveryDelay",
        "deliveryDelay": {
            "delayType": "MailboxFull",
            "delayedRecipients": [{"emailAddress": "a@b.c"}],
        },
        "mail": SES_MAIL,
    }
    assert [(e.kind, e.detail) for e in ses_events("e", delay, received_at=NOW)] == [
        ("deferred", "MailboxFull")
    ]
    reject = {"eventType": "Reject", "reject": {"reason": "Bad content"}, "mail": SES_MAIL}
    assert {e.kind for e in ses_events("f", reject, received_at=NOW)} == {"dropped"}


def test_ses_event_publishing_opens_and_clicks():
    click = {
        "eventType": "Click",
        "click": {
            "ipAddress": "192.0.2.1",
            "link": "https://example.com/a",
            "timestamp": "2017-08-09T23:51:25.570Z",
            "userAgent": "Mozilla/5.0",
        },
        "mail": dict(SES_MAIL, destination=["jane@example.com"]),
    }
    [event] = ses_events("g", click, received_at=NOW)
    assert (event.kind, event.url, event.ip, event.recipient) == (
        "click",
        "https://example.com/a",
        "192.0.2.1",
        "jane@example.com",
    )


def test_our_id_is_found_in_headers_before_the_common_headers():
    mail = {
        "headers": [
            {"name": "Message-ID", "value": "<rewritten@amazonses.com>"},
            {"name": "X-Herald-Message-ID", "value": "<ours@herald>"},
        ],
        "commonHeaders": {"messageId": "<rewritten@amazonses.com>"},
    }
    assert ses_message_id(mail) == "ours@herald"
    assert ses_message_id({"commonHeaders": {"messageId": "<c@d>"}}) == "c@d"
    assert ses_message_id({}) is None


def test_odd_ses_payloads_do_not_raise():
    for odd in ({}, {"notificationType": "Bounce"}, {"mail": "x", "bounce": []}, {"eventType": 3}):
        events = ses_events("h", odd, received_at=NOW)
        assert all(e.at for e in events)


def test_sendgrid_events():
    base = {
        "email": "Example@Test.com",
        "timestamp": 1513299569,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "sg_event_id": "sg_event_id",
        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
    }
    bounce = sendgrid_event(
        {**base, "event": "bounce", "type": "bounce", "reason": "550"}, received_at=NOW
    )
    assert bounce is not None
    assert (bounce.kind, bounce.hard, bounce.recipient) == ("bounce", True, "example@test.com")
    assert bounce.message_id == "14c5d75ce93.dfd.64b469@ismtpd-555"
    assert bounce.provider_message_id == "14c5d75ce93"
    assert bounce.at == datetime.fromtimestamp(1513299569, UTC)
    blocked = sendgrid_event({**base, "event": "bounce", "type": "blocked"}, received_at=NOW)
    assert blocked is not None
    assert not blocked.hard
    dropped = sendgrid_event(
        {**base, "event": "dropped", "reason": "Bounced Address"}, received_at=NOW
    )
    assert dropped is not None
    assert (dropped.kind, dropped.hard) == ("dropped", True)
    spam = sendgrid_event(
        {**base, "event": "spamreport", "herald_message_id": "<ours@h>"}, received_at=NOW
    )
    assert spam is not None
    assert (spam.kind, spam.message_id) == ("complaint", "ours@h")
    opened = sendgrid_event({**base, "event": "open", "sg_machine_open": True}, received_at=NOW)
    assert opened is not None
    assert (opened.kind, opened.machine) == ("open", True)
    other = sendgrid_event({"event": "group_unsubscribe"}, received_at=NOW)
    assert other is not None
    assert (other.kind, other.at, len(other.event_id)) == ("other", NOW, 64)
    assert sendgrid_event("nonsense", received_at=NOW) is None


def test_link_keys_of_unrewritten_links_are_negative_and_stable():
    assert link_key("https://a.example/") == link_key("https://a.example/") < 0
    assert link_key("https://a.example/") != link_key("https://b.example/")
