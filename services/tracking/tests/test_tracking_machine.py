"""Telling machines from people: agent and address rules, and scanners' bursts of clicks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tracking.machine import BurstDetector, Classifier, parse_networks, soon_after_delivery

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
classifier = Classifier(parse_networks("17.0.0.0/8, 2620:149::/32"))


@pytest.mark.parametrize(
    ("agent", "ip", "method", "reason"),
    [
        (CHROME, "203.0.113.9", "GET", None),
        (GMAIL, "66.249.84.1", "GET", "image_proxy"),
        ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy", None, "GET", "image_proxy"),
        ("Mozilla/5.0", "203.0.113.9", "GET", "apple_mpp"),
        (CHROME, "17.58.101.4", "GET", "apple_mpp"),
        (CHROME, "2620:149:a:b::1", "GET", "apple_mpp"),
        (CHROME, "not-an-address", "GET", None),
        (None, None, "GET", "no_user_agent"),
        ("  ", None, "GET", "no_user_agent"),
        (CHROME, None, "HEAD", "head_request"),
        ("Mozilla/5.0 (compatible; Barracuda Sentinel (EE))", None, "GET", "scanner_agent"),
        ("python-requests/2.32", None, "GET", "scanner_agent"),
    ],
)
def test_open_rules(agent, ip, method, reason):
    assert classifier.open_reason(agent, ip, method) == reason


def test_click_rules_ignore_apple_networks():
    assert classifier.click_reason(CHROME) is None
    assert Classifier().open_reason(CHROME, "17.1.1.1") is None
    assert classifier.click_reason("Mozilla/5.0 HeadlessChrome/130.0") == "scanner_agent"
    assert classifier.click_reason("Mozilla/5.0 (compatible; Mimecast)") == "scanner_agent"
    assert classifier.click_reason(CHROME, "HEAD") == "head_request"


def test_clicks_right_after_delivery_are_a_scanners():
    sent = datetime(2026, 3, 1, tzinfo=UTC)
    assert soon_after_delivery(sent + timedelta(seconds=2), sent, 5)
    assert not soon_after_delivery(sent + timedelta(seconds=6), sent, 5)
    assert not soon_after_delivery(sent, None, 5)


def test_bursts_of_different_links_are_seen_around_each_click():
    detector = BurstDetector(links=2, seconds=2)
    detector.record("m1", 100.0, 0)
    detector.record("m1", 100.0, 0)  # the same link twice: a double click, not a burst
    assert not detector.is_burst("m1", 100.0)
    detector.record("m1", 101.5, 1)
    assert detector.is_burst("m1", 100.0)
    assert detector.is_burst("m1", 101.5)
    detector.record("m1", 110.0, 2)
    assert not detector.is_burst("m1", 110.0)
    detector.record("m2", 200.0, 0)
    detector.record("m2", 203.0, 1)
    assert not detector.is_burst("m2", 200.0)


def test_the_detector_forgets_old_messages_and_stays_bounded():
    detector = BurstDetector(links=2, seconds=2, max_messages=3)
    for n in range(5):
        detector.record(f"m{n}", float(n), 0)
    assert len(detector) == 3
    detector.forget_before(3.5)
    assert len(detector) == 1
    assert not detector.is_burst("m0", 0.0)


def test_bad_networks_are_refused():
    with pytest.raises(ValueError, match=r"17\.0\.0\.1/8"):
        parse_networks("17.0.0.1/8")
