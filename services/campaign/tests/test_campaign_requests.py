import uuid

import orjson
import pytest

from campaign.requests import parse_request
from herald.events import Envelope, PoisonMessage
from herald.events.requests import SendRequested


def bare(**fields: object) -> bytes:
    document: dict[str, object] = {
        "api_key": "hk_live_123",
        "idempotency_key": "order-1",
        "to": ["ann@example.com"],
        "subject": "Your order",
        "text": "Thanks {{ name }}",
        "template_vars": {"name": "Ann"},
    }
    document.update(fields)
    return orjson.dumps({k: v for k, v in document.items() if v is not None})


def test_a_bare_request_is_accepted_with_one_address_or_many():
    envelope, is_bare = parse_request(bare(to="ann@example.com"))
    assert is_bare
    assert envelope.account_id is None
    assert envelope.data.to == ["ann@example.com"]
    assert envelope.data.api_key == "hk_live_123"


def test_an_envelope_keeps_its_id_and_account():
    account = uuid.uuid4()
    request = SendRequested(
        idempotency_key="confirm-1", to=["a@x.io"], subject="Confirm", text="t", system=True
    )
    sent = Envelope.wrap(request, account_id=account)
    envelope, is_bare = parse_request(sent.to_bytes())
    assert not is_bare
    assert (envelope.id, envelope.account_id, envelope.data) == (sent.id, account, request)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty message"),
        (b"{oops", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (bare(colour="blue"), "unknown key(s): colour"),
        (bare(api_key=None), "api_key: required"),
        (bare(to=[]), "to"),
        (bare(to=["not an address"]), "not a valid email address"),
        (bare(subject=None), "subject"),
        (bare(text="{% if %}"), "template does not parse"),
        (bare(from_email="nope"), "from_email"),
        (
            orjson.dumps({"type": "contact.suppressed", "data": {}, "id": str(uuid.uuid4())}),
            "unexpected event type",
        ),
    ],
)
def test_invalid_requests_are_poison_with_a_reason(raw: bytes | None, reason: str):
    with pytest.raises(PoisonMessage) as caught:
        parse_request(raw)
    assert reason in caught.value.reason
