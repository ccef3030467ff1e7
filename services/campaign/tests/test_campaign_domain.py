import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from campaign import domain
from herald.errors import ApiError

POLICY = domain.SenderPolicy(require_verified=True, allowed_domains=frozenset({"herald.io"}))
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def sender(**overrides: object) -> domain.Sender:
    fields: dict[str, object] = {
        "email": "Ann@Example.com",
        "email_verified": True,
        "default_sender_name": "Ann",
        "reply_to": "replies@example.com",
        "timezone": "Europe/Paris",
        "status": "active",
        "daily_send_quota": None,
    }
    fields.update(overrides)
    return domain.Sender(**fields)  # type: ignore[arg-type]


def fails(status: int, field: str | None = None):
    class Check:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind: object, exc: object, tb: object) -> bool:
            assert isinstance(exc, ApiError), exc
            assert exc.status == status
            if field is not None:
                assert exc.details[0].field == field
            return True

    return Check()


def test_content_needs_a_body_and_derives_text_from_html():
    with fails(422, "html"):
        domain.prepare_content("s", None, None)
    content = domain.prepare_content("s", "<p>Hi {{ contact.first_name }}</p>", None)
    assert content.text == "Hi {{ contact.first_name }}\n"
    assert content.text_derived
    assert not domain.prepare_content("s", "<p>x</p>", "x").text_derived


def test_a_broken_template_is_a_422_naming_part_and_line():
    with pytest.raises(ApiError) as caught:
        domain.prepare_content("s", "line one\n{% if %}", None)
    assert caught.value.details[0].field == "html"
    assert "line 2" in caught.value.message
    with fails(422, "subject"):
        domain.prepare_content("{{ }", None, "t")


def test_addresses_are_validated_normalised_and_deduplicated():
    assert domain.addresses(["a@EXAMPLE.com", "a@example.com", "b@x.io"], "to") == [
        "a@example.com",
        "b@x.io",
    ]
    with fails(422, "to"):
        domain.addresses(["not-an-address"], "to")


def test_from_must_be_the_verified_address_or_an_allowed_domain():
    assert domain.check_from("ann@example.com", sender(), POLICY) == "ann@example.com"
    assert domain.check_from("news@herald.io", None, POLICY) == "news@herald.io"
    with fails(422, "from_email"):
        domain.check_from("other@example.com", sender(), POLICY)
    with fails(422, "from_email"):
        domain.check_from("ann@example.com", sender(email_verified=False), POLICY)
    with fails(422, "from_email"):
        domain.check_from("ann@example.com", None, POLICY)
    open_policy = domain.SenderPolicy(require_verified=False, allowed_domains=frozenset())
    assert domain.check_from("any@where.io", None, open_policy) == "any@where.io"


def test_identity_defaults_to_the_profile():
    identity = domain.resolve_identity(
        from_email=None, from_name=None, reply_to=None, sender=sender(), policy=POLICY
    )
    assert identity == domain.Identity("Ann@example.com", "Ann", "replies@example.com")
    with fails(422, "from_email"):
        domain.resolve_identity(
            from_email=None, from_name=None, reply_to=None, sender=None, policy=POLICY
        )
    with fails(403):
        domain.resolve_identity(
            from_email=None,
            from_name=None,
            reply_to=None,
            sender=sender(status="disabled"),
            policy=POLICY,
        )


def test_send_at_without_a_zone_is_in_the_profile_timezone_and_must_be_future():
    naive = datetime(2030, 1, 1, 14, 30)
    resolved = domain.resolve_send_at(naive, timezone="Europe/Paris", now=NOW)
    assert resolved.astimezone(UTC) == datetime(2030, 1, 1, 13, 30, tzinfo=UTC)
    assert domain.resolve_send_at(naive, timezone="No/Such_Zone", now=NOW).utcoffset() == timedelta(
        0
    )
    with fails(422, "send_at"):
        domain.resolve_send_at(NOW - timedelta(seconds=1), timezone=None, now=NOW)
    with fails(422, "send_at"):
        domain.resolve_send_at(NOW + timedelta(days=400), timezone=None, now=NOW)


def test_quota_day_is_the_accounts_calendar_day():
    late = datetime(2030, 1, 1, 23, 30, tzinfo=UTC)
    assert domain.quota_day(late, "UTC") == date(2030, 1, 1)
    assert domain.quota_day(late, "Europe/Paris") == date(2030, 1, 2)


def test_quota_refuses_what_would_exceed_it():
    domain.check_quota(quota=None, used=10**9, needed=10)
    domain.check_quota(quota=10, used=7, needed=3)
    with pytest.raises(ApiError) as caught:
        domain.check_quota(quota=10, used=7, needed=4)
    assert caught.value.status == 429
    assert caught.value.code == "quota_exceeded"
    assert "3 left today" in caught.value.message


def test_completion_waits_for_every_recipient():
    assert domain.completion(status="sending", recipients=None, sent=5, failed=0) is None
    assert domain.completion(status="sending", recipients=3, sent=2, failed=0) is None
    assert domain.completion(status="sending", recipients=3, sent=2, failed=1) == "sent"
    assert domain.completion(status="sending", recipients=2, sent=0, failed=2) == "failed"
    assert domain.completion(status="queued", recipients=0, sent=0, failed=0) == "sent"
    assert domain.completion(status="cancelled", recipients=1, sent=1, failed=0) is None


def test_cursors_round_trip_and_garbage_is_a_422():
    email_id = uuid.uuid4()
    assert domain.decode_cursor(domain.encode_cursor(NOW, email_id)) == (NOW, email_id)
    with fails(422, "cursor"):
        domain.decode_cursor("garbage!")


def test_only_a_finished_email_with_failures_and_recent_can_be_retried():
    recent = NOW - timedelta(hours=1)
    domain.check_retry(status="sent", failed=1, sent_at=recent, now=NOW)
    domain.check_retry(status="failed", failed=3, sent_at=recent, now=NOW)
    domain.check_retry(status="sent", failed=1, sent_at=NOW - timedelta(days=6), now=NOW)
    refusals = [
        ("sending", 1, recent, "this email is sending"),
        ("scheduled", 0, recent, "this email is scheduled"),
        ("cancelled", 1, recent, "this email is cancelled"),
        ("draft", 0, None, "this email is draft"),
        ("sent", 0, recent, "nothing to retry"),
        ("failed", 2, NOW - timedelta(days=8), "more than 7 days ago"),
    ]
    for status, failed, sent_at, why in refusals:
        with pytest.raises(ApiError) as caught:
            domain.check_retry(status=status, failed=failed, sent_at=sent_at, now=NOW)
        assert caught.value.status == 409, status
        assert why in caught.value.message, (status, caught.value.message)
