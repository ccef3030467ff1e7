"""Unit tests of what token verifiers keep from auth's revocation events (no I/O)."""

import uuid

from herald.events.auth import SessionsRevoked, UserChanged
from herald.security import Principal, Revocations


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _principal(user_id: uuid.UUID, session_id: uuid.UUID | None, issued_at: float) -> Principal:
    return Principal(
        user_id=user_id,
        account_id=user_id,
        role="user",
        scope="full",
        token_id=uuid.uuid4().hex,
        session_id=session_id,
        issued_at=issued_at,
    )


def _ended(user_id: uuid.UUID, *sessions: uuid.UUID, until: float) -> SessionsRevoked:
    return SessionsRevoked(user_id=user_id, session_ids=list(sessions), tokens_expire_at=until)


def test_an_ended_session_voids_only_its_own_tokens():
    clock = Clock(1_000.0)
    revocations = Revocations(clock)
    user, ended, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    revocations.apply(_ended(user, ended, until=1_600.0))
    assert revocations.refuses(_principal(user, ended, 990.0))
    assert not revocations.refuses(_principal(user, kept, 990.0))
    # API-key tokens carry no session: only the user-wide instant applies to them.
    assert not revocations.refuses(_principal(user, None, 990.0))


def test_sessions_are_forgotten_once_their_tokens_expired():
    clock = Clock(1_000.0)
    revocations = Revocations(clock)
    user, first, second = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    revocations.apply(_ended(user, first, until=1_600.0))
    revocations.apply(_ended(user, first, until=1_900.0))  # ended again later: the later wins
    clock.now = 1_700.0
    revocations.apply(_ended(user, second, until=2_300.0))
    assert revocations.refuses(_principal(user, first, 990.0))
    clock.now = 2_000.0
    revocations.apply(_ended(user, uuid.uuid4(), until=2_600.0))
    assert not revocations.refuses(_principal(user, first, 990.0))
    assert revocations.refuses(_principal(user, second, 990.0))


def test_replayed_events_of_long_expired_tokens_are_not_kept():
    revocations = Revocations(Clock(5_000.0))
    user, session = uuid.uuid4(), uuid.uuid4()
    revocations.apply(_ended(user, session, until=4_000.0))
    assert not revocations.refuses(_principal(user, session, 3_500.0))


def test_a_user_changed_instant_voids_every_earlier_token_and_a_later_one_resets_it():
    revocations = Revocations(Clock(1_000.0))
    user = uuid.uuid4()

    def changed(valid_after: float | None) -> UserChanged:
        return UserChanged(
            user_id=user,
            email="a@example.com",
            status="active",
            role="user",
            tokens_valid_after=valid_after,
        )

    revocations.apply(changed(950.0))
    assert revocations.refuses(_principal(user, uuid.uuid4(), 949.0))
    assert not revocations.refuses(_principal(user, uuid.uuid4(), 951.0))
    revocations.apply(changed(None))
    assert not revocations.refuses(_principal(user, uuid.uuid4(), 949.0))
