"""Unit tests of the request target the proxy sends on: as the client encoded it."""

from starlette.requests import Request

from gateway.proxy import _upstream_url


def _request(raw_path: bytes, query: bytes) -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": raw_path.decode("utf-8"),
            "raw_path": raw_path,
            "query_string": query,
            "headers": [],
        }
    )


def test_the_path_and_query_go_on_as_the_client_encoded_them():
    request = _request(b"/contacts/a%2Fb%20c", b"q=%C3%A9&tag=a+b")
    url = _upstream_url(request, "http://contacts:8002")
    assert str(url) == "http://contacts:8002/contacts/a%2Fb%20c?q=%C3%A9&tag=a+b"
    assert url.raw_path_qs == "/contacts/a%2Fb%20c?q=%C3%A9&tag=a+b"
    assert str(_upstream_url(_request(b"/contacts", b""), "http://c")) == "http://c/contacts"


def test_octets_beyond_ascii_go_on_percent_encoded_and_nothing_else_changes():
    request = _request("/contacts/é%41".encode(), "q=ü&r=%2F".encode())
    url = _upstream_url(request, "http://contacts:8002")
    assert url.raw_path_qs == "/contacts/%C3%A9%41?q=%C3%BC&r=%2F"
