"""The app as built (not started): its OpenAPI document and its settings' checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tracking.app import create_app
from tracking.config import Settings


def test_the_openapi_document_describes_every_public_route():
    schema = create_app(Settings()).openapi()
    paths = schema["paths"]
    for path in ("/t/o/{token}", "/t/c/{token}", "/tracking/{email_id}", "/reports"):
        assert "get" in paths[path], path
    for path in ("/webhooks/ses", "/webhooks/sendgrid"):
        assert "post" in paths[path], path
    report = {p["name"] for p in paths["/reports"]["get"]["parameters"]}
    assert {"from", "to", "email_id", "tag", "interval", "format", "table"} <= report


def test_settings_refuse_bad_networks_and_patterns():
    with pytest.raises(ValidationError, match="does not appear to be an IPv4 or IPv6 network"):
        Settings(mpp_networks="17.0.0.0/8, nonsense")
    with pytest.raises(ValidationError, match="not a regular expression"):
        Settings(sns_cert_hosts="(unclosed")
