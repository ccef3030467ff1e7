import uuid

import orjson
import pytest

from herald import events
from herald.events import Envelope, PoisonMessage, decode
from herald.events.campaign import Audience, EmailCancelled, EmailContent, EmailScheduled
from herald.events.contacts import ContactSuppressed


def _scheduled() -> EmailScheduled:
    return EmailScheduled(
        email_id=uuid.uuid4(),
        revision=1,
        send_at="2030-01-01T09:00:00+01:00",
        kind="campaign",
        content=EmailContent(subject="Héllo {{ contact.first_name }}", from_email="a@example.com"),
        audience=Audience(list_ids=[uuid.uuid4()]),
    )


def test_envelope_round_trips_through_the_wire():
    account = uuid.uuid4()
    envelope = Envelope.wrap(_scheduled(), account_id=account, correlation_id="req-1")
    decoded = decode(envelope.to_bytes())
    assert decoded == envelope
    assert isinstance(decoded.data, EmailScheduled)
    assert decoded.type == "email.scheduled"
    assert decoded.version == 1
    assert decoded.occurred_at.utcoffset() is not None


def test_two_event_types_can_share_a_topic_and_stay_distinct():
    cancelled = Envelope.wrap(EmailCancelled(email_id=uuid.uuid4(), revision=2), account_id=None)
    assert cancelled.topic == "email.scheduled"
    assert isinstance(decode(cancelled.to_bytes()).data, EmailCancelled)


def test_partition_key_keeps_one_emails_events_together():
    scheduled = _scheduled()
    cancelled = EmailCancelled(email_id=scheduled.email_id, revision=2)
    assert scheduled.partition_key() == cancelled.partition_key() == str(scheduled.email_id)


def _document(**overrides: object) -> bytes:
    envelope = Envelope.wrap(
        ContactSuppressed(contact_id=None, email="a@example.com", reason="manual"),
        account_id=uuid.uuid4(),
    )
    document = orjson.loads(envelope.to_bytes())
    document.update(overrides)
    return orjson.dumps(document)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty message"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"{}", "bad envelope"),
        (_document(type="no.such.event"), "unknown event type"),
        (_document(version=99), "newer than this reader"),
        (_document(data={"email": "a@example.com"}), "bad contact.suppressed"),
        (_document(occurred_at="2030-01-01T00:00:00"), "bad contact.suppressed"),
        (_document(id="not-a-uuid"), "bad envelope"),
    ],
)
def test_undecodable_messages_are_poison_with_a_reason(raw: bytes | None, reason: str):
    with pytest.raises(PoisonMessage) as caught:
        decode(raw)
    assert reason in caught.value.reason


def test_readers_tolerate_fields_they_do_not_know():
    document = orjson.loads(_document())
    document["data"]["added_later"] = True
    assert isinstance(decode(orjson.dumps(document)).data, ContactSuppressed)


def test_every_topic_has_a_dead_letter_topic():
    topics = events.topics()
    main = [t for t in topics if not t.endswith(".dlq")]
    assert {"email.scheduled", "email.dispatched", "email.opened", "email.requests"} <= set(main)
    assert all(f"{t}.dlq" in topics for t in main)
