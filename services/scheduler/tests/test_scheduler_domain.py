from herald.events.scheduler import Recipient
from scheduler import domain
from scheduler.domain import Progress

START = Progress(phase="to", to_offset=0, cursor=None, batch_no=0, total=0)


def test_unique_addresses_keep_the_first_spelling_and_order():
    assert domain.unique_addresses([" A@x.io", "b@x.io", "a@X.IO", ""]) == ["A@x.io", "b@x.io"]


def test_a_newer_revision_replaces_a_pending_or_cancelled_timer_only():
    assert domain.replaces(incoming_revision=1, current_revision=None, current_state=None)
    assert domain.replaces(incoming_revision=3, current_revision=2, current_state="pending")
    assert domain.replaces(incoming_revision=3, current_revision=2, current_state="cancelled")
    assert not domain.replaces(incoming_revision=2, current_revision=2, current_state="pending")
    assert not domain.replaces(incoming_revision=1, current_revision=2, current_state="pending")
    assert not domain.replaces(incoming_revision=5, current_revision=2, current_state="fired")


def test_literal_steps_chunk_and_drop_the_suppressed():
    to = ["a@x.io", "b@x.io", "c@x.io"]
    step = domain.literal_step(
        START, to=to, suppressed={"b@x.io"}, batch_size=2, has_contacts=False
    )
    assert [r.email for r in step.recipients] == ["a@x.io"]
    assert step.after == Progress(phase="to", to_offset=2, cursor=None, batch_no=1, total=1)
    assert not step.done
    last = domain.literal_step(
        step.after, to=to, suppressed=set(), batch_size=2, has_contacts=False
    )
    assert [r.email for r in last.recipients] == ["c@x.io"]
    assert last.done
    assert last.after.total == 2


def test_literal_phase_hands_over_to_contacts_when_there_are_lists():
    step = domain.literal_step(START, to=[], suppressed=set(), batch_size=10, has_contacts=True)
    assert step.recipients == []
    assert step.after.phase == "contacts"
    assert step.after.batch_no == 0
    assert not step.done


def test_an_empty_audience_is_done_at_once():
    step = domain.literal_step(START, to=[], suppressed=set(), batch_size=10, has_contacts=False)
    assert step.done
    assert step.after.total == 0


def test_contact_pages_skip_addresses_already_mailed_literally():
    progress = Progress(phase="contacts", to_offset=1, cursor=None, batch_no=1, total=1)
    page = [Recipient(email="A@x.io"), Recipient(email="b@x.io")]
    step = domain.contacts_step(
        progress, page=page, next_cursor="c1", literal={"a@x.io"}, last=False
    )
    assert [r.email for r in step.recipients] == ["b@x.io"]
    assert step.after == Progress(phase="contacts", to_offset=1, cursor="c1", batch_no=2, total=2)
    empty = domain.contacts_step(
        progress, page=page[:1], next_cursor=None, literal={"a@x.io"}, last=True
    )
    assert empty.recipients == []
    assert empty.after.batch_no == 1
    assert empty.done
