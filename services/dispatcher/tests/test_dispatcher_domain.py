"""The dispatcher's rules: addresses, relay URLs, what replies mean, retries, rates."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.domain import (
    InvalidAddress,
    Pacer,
    RelayTarget,
    RetryPolicy,
    Verdict,
    clean_reply,
    dedupe_key,
    judge,
    mailbox,
    relay_target,
)


def test_addresses_get_an_ascii_domain_and_say_when_they_need_smtputf8():
    assert mailbox(" Ann@Example.com ").address == "Ann@Example.com"
    assert mailbox("ann@bücher.example").address == "ann@xn--bcher-kva.example"
    box = mailbox("ünï@example.com")
    assert box.smtputf8
    assert box.address == "ünï@example.com"
    assert not mailbox("a+tag@example.com").smtputf8
    assert dedupe_key(" Ann@Example.COM") == "ann@example.com"


@pytest.mark.parametrize(
    "address",
    [
        "",
        "no-at-sign",
        "@example.com",
        "ann@",
        "ann@localhost",
        "a b@example.com",
        "ann@exa mple.com",
        "<ann@example.com>",
        "ann@example.com\r\nRCPT TO:<x@y.z>",
        "ann@@example.com",
        ".ann@example.com",
        "an..n@example.com",
        "ann@-bad_label.com",
        "x" * 65 + "@example.com",
        "ann@" + "a" * 64 + ".com",
    ],
)
def test_addresses_smtp_cannot_carry_are_refused(address: str):
    with pytest.raises(InvalidAddress):
        mailbox(address)


def test_relay_urls():
    assert relay_target("smtp://127.0.0.1:1025") == RelayTarget("127.0.0.1", 1025, "none")
    assert relay_target("smtp+starttls://apikey:s%40cret@smtp.sendgrid.net") == RelayTarget(
        "smtp.sendgrid.net", 587, "starttls", "apikey", "s@cret"
    )
    assert relay_target("SMTPS://user@mail.example.com") == RelayTarget(
        "mail.example.com", 465, "implicit", "user", None
    )
    assert relay_target("smtp://relay").port == 25
    for bad in ("http://example.com", "smtp://", "smtp://host:notaport"):
        with pytest.raises(ValueError, match="SMTP_URL"):
            relay_target(bad)


def test_what_replies_mean():
    assert judge(250, "end") == Verdict("sent")
    assert judge(250, "rcpt") == Verdict("deferred")  # not delivered until the end of DATA
    assert judge(451, "rcpt") == Verdict("deferred")
    assert judge(421, "mail") == Verdict("deferred")
    assert judge(None, "connect") == Verdict("deferred")
    assert judge(None, "end") == Verdict("deferred")
    assert judge(550, "rcpt") == Verdict("failed", hard_bounce=True)
    assert judge(554, "end") == Verdict("failed", hard_bounce=True)
    # Our sender refused, or DATA itself: the recipient's address is not to blame.
    assert judge(553, "mail") == Verdict("failed", hard_bounce=False)
    assert judge(554, "data") == Verdict("failed", hard_bounce=False)
    assert judge(999, "end") == Verdict("deferred")


def test_retries_back_off_exponentially_with_jitter_up_to_a_horizon():
    policy = RetryPolicy(base_seconds=60, max_seconds=3600, horizon_seconds=4 * 3600)
    rng = random.Random(1)
    for attempt, step in [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (20, 3600)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # spread, not a fixed step
    queued = datetime(2026, 1, 1, tzinfo=UTC)
    due = policy.next_attempt(attempt=1, queued_at=queued, now=queued, rng=rng)
    assert due is not None
    assert queued + timedelta(seconds=30) <= due <= queued + timedelta(60)
    late = queued + timedelta(hours=3, minutes=59)
    assert policy.next_attempt(attempt=9, queued_at=queued, now=late, rng=rng) is None


def test_pacer_spaces_events_and_allows_bursts():
    pacer = Pacer(rate=10, burst=1)
    assert pacer.reserve(0.0) == 0
    assert pacer.reserve(0.0) == pytest.approx(0.1)
    assert pacer.reserve(0.0) == pytest.approx(0.2)
    assert pacer.busy(0.05)
    assert not pacer.busy(0.31)
    assert pacer.reserve(10.0) == 0  # idle time is not saved up beyond the burst
    assert pacer.reserve(10.0) == pytest.approx(0.1)
    bursty = Pacer(rate=2, burst=3)
    assert [bursty.reserve(0.0) for _ in range(4)] == pytest.approx([0, 0, 0, 0.5])
    with pytest.raises(ValueError, match="rate"):
        Pacer(rate=0)


def test_replies_are_stored_on_one_bounded_line():
    assert clean_reply("5.1.1 <a@b>:\n  user unknown") == "5.1.1 <a@b>: user unknown"
    assert len(clean_reply("x " * 2000)) == 1000
