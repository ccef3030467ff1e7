"""Unit tests of the AsyncAPI document generated from the event contracts."""

from typing import Any

from gateway.asyncapi import document
from herald.events import EVENT_TYPES


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_event_type_is_a_message_on_its_topic():
    doc = document(version="9.9.9")
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == "9.9.9"
    by_address = {c["address"]: c for c in doc["channels"].values()}
    for cls in EVENT_TYPES.values():
        channel = by_address[cls.TOPIC]
        names = [_resolve(doc, m["$ref"])["name"] for m in channel["messages"].values()]
        assert cls.TYPE in names
        schema = doc["components"]["schemas"][cls.__name__]
        assert schema["type"] == "object"


def test_send_requests_are_received_in_both_forms_and_the_rest_is_sent():
    doc = document(version="1")
    operations = doc["operations"]
    receive = operations["receiveEmailRequests"]
    assert receive["action"] == "receive"
    messages = [_resolve(doc, _resolve(doc, m["$ref"])["$ref"]) for m in receive["messages"]]
    assert {m["title"] for m in messages} == {"email.requested", "Bare send request"}
    others = [o for name, o in operations.items() if name != "receiveEmailRequests"]
    assert {o["action"] for o in others} == {"send"}


def test_envelopes_pin_their_type_and_every_reference_resolves():
    doc = document(version="1")
    opened = doc["components"]["messages"]["emailOpened"]["payload"]
    assert opened["properties"]["type"]["const"] == "email.opened"
    assert opened["properties"]["data"] == {"$ref": "#/components/schemas/EmailOpened"}

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [
                r for v in node.values() for r in refs(v)
            ]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        _resolve(doc, ref)
