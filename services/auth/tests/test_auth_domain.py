import time
from datetime import UTC, datetime, timedelta

import pyotp
import pytest

from auth import domain
from auth.flows import _totp_step


@pytest.mark.parametrize("name", ["ada", "ada.lovelace", "a-1_b", "x" * 32])
def test_good_usernames(name: str):
    assert domain.username_problem(name) is None


@pytest.mark.parametrize("name", ["ab", "x" * 33, "-ada", "ada.", "Ada", "ada lovelace", "adä", ""])
def test_bad_usernames(name: str):
    assert domain.username_problem(name) is not None


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short", "at least 12"),
        ("x" * 129, "at most 128"),
        ("password1234", "too common"),
        ("qwertyuiopasdf", "too easy"),
        ("aaaaaaaaaaaaaaaa", "too easy"),
        ("lovelace-is-my-name", "username"),
    ],
)
def test_weak_passwords_are_refused_with_a_reason(password: str, reason: str):
    problem = domain.password_problem(password, username="lovelace", email="ada@example.com")
    assert problem is not None
    assert reason in problem


def test_a_long_passphrase_is_accepted():
    assert domain.password_problem("plum orbit candle harbor", username="ada") is None


def test_locks_double_from_thirty_seconds_up_to_fifteen_minutes():
    threshold = domain.FAILURES_BEFORE_LOCK
    assert domain.lock_duration(threshold - 1, threshold) is None
    assert domain.lock_duration(threshold, threshold) == timedelta(seconds=30)
    assert domain.lock_duration(threshold + 1, threshold) == timedelta(seconds=60)
    assert domain.lock_duration(threshold + 40, threshold) == timedelta(minutes=15)


def test_recovery_codes_are_distinct_and_normalise_leniently():
    codes = domain.new_recovery_codes()
    assert len(set(codes)) == 10
    code = codes[0]
    assert domain.normalise_recovery_code(code.upper().replace("-", " ")) == code
    assert domain.token_hash(domain.normalise_recovery_code(code)) == domain.token_hash(code)


def test_api_keys_are_recognisable_and_unique():
    key, prefix = domain.new_api_key()
    assert domain.looks_like_api_key(key)
    assert key.startswith(f"hk_{prefix}_")
    assert domain.new_api_key()[0] != key


def test_totp_step_accepts_the_current_and_adjacent_codes_only():
    secret = domain.b32_secret()
    totp = pyotp.TOTP(secret)
    now = time.time()
    current = _totp_step(secret, totp.at(now))
    assert current == totp.timecode(datetime.fromtimestamp(now, UTC))
    assert _totp_step(secret, totp.at(now - 30)) == current - 1
    assert _totp_step(secret, totp.at(now - 300)) is None
