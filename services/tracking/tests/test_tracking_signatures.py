"""Webhook signatures: SNS messages against their signing certificate, SendGrid's ECDSA.

The certificate is served by httpx's in-memory transport, standing in for SNS's endpoint.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from tracking.config import SNS_HOSTS
from tracking.signatures import (
    SnsVerifier,
    WebhookRejected,
    load_sendgrid_key,
    sendgrid_signature_ok,
    sns_string_to_sign,
)
from tracking.webhooks import Webhooks

CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:herald"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(days: int = 30) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=60))
        .not_valid_after(now + timedelta(days=days))
        .sign(KEY, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def signed(**fields: Any) -> dict[str, Any]:
    message = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Subject": "My First Message",
        "Message": "Hello world!",
        "Timestamp": "2012-05-02T00:54:06.655Z",
        "SignatureVersion": "1",
        "SigningCertURL": CERT_URL,
        **fields,
    }
    algorithm = hashes.SHA1() if message["SignatureVersion"] == "1" else hashes.SHA256()  # noqa: S303
    signature = KEY.sign(sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
    return message | {"Signature": base64.b64encode(signature).decode()}


def verifier(
    answer: Callable[[httpx.Request], httpx.Response], topics: frozenset[str] = frozenset({TOPIC})
) -> tuple[SnsVerifier, list[str]]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return answer(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return SnsVerifier(http=http, host_pattern=SNS_HOSTS, topics=topics), seen


def test_the_string_to_sign_follows_the_sns_documentation():
    message = signed()
    assert sns_string_to_sign(message) == (
        b"Message\nHello world!\nMessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\n"
        b"Subject\nMy First Message\nTimestamp\n2012-05-02T00:54:06.655Z\n"
        b"TopicArn\narn:aws:sns:eu-west-1:123456789012:herald\nType\nNotification\n"
    )
    without_subject = {k: v for k, v in message.items() if k != "Subject"}
    assert b"Subject" not in sns_string_to_sign(without_subject)
    with pytest.raises(WebhookRejected):
        sns_string_to_sign({"Type": "SubscriptionConfirmation", "Message": "m"})


async def test_genuine_messages_verify_and_the_certificate_is_fetched_once():
    sns, seen = verifier(lambda _: httpx.Response(200, content=_certificate()))
    await sns.verify(signed())
    await sns.verify(signed(SignatureVersion="2", Message="again"))
    assert seen == [CERT_URL]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({**signed(), "Message": "Hello world?"}, "signature"),
        ({**signed(), "Signature": "not base64!"}, "signature"),
        (signed(SignatureVersion="9"), "signature"),
        (
            signed(SigningCertURL="https://sns.eu-west-1.amazonaws.com.evil.example/c.pem"),
            "certificate_host",
        ),
        (signed(SigningCertURL="http://sns.eu-west-1.amazonaws.com/c.pem"), "certificate_host"),
        (
            signed(SigningCertURL="https://user@sns.eu-west-1.amazonaws.com/c.pem"),
            "certificate_host",
        ),
        (signed(TopicArn="arn:aws:sns:eu-west-1:999999999999:theirs"), "topic"),
    ],
)
async def test_forged_or_foreign_messages_are_refused(message, reason):
    sns, _ = verifier(lambda _: httpx.Response(200, content=_certificate()))
    with pytest.raises(WebhookRejected) as refused:
        await sns.verify(message)
    assert refused.value.reason == reason


async def test_certificate_troubles():
    unavailable, _ = verifier(lambda _: httpx.Response(404))
    with pytest.raises(WebhookRejected) as refused:
        await unavailable.verify(signed())
    assert (refused.value.status, refused.value.reason) == (503, "certificate_unavailable")
    expired, _ = verifier(lambda _: httpx.Response(200, content=_certificate(days=-1)))
    with pytest.raises(WebhookRejected, match="expired"):
        await expired.verify(signed())
    garbage, _ = verifier(lambda _: httpx.Response(200, content=b"hello"))
    with pytest.raises(WebhookRejected, match="PEM"):
        await garbage.verify(signed())


async def test_subscriptions_are_confirmed_only_at_sns():
    sns, seen = verifier(lambda _: httpx.Response(200, text="<ok/>"))
    url = "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=t"
    await sns.confirm({"SubscribeURL": url})
    with pytest.raises(WebhookRejected, match="SubscribeURL"):
        await sns.confirm({"SubscribeURL": "https://127.0.0.1/admin"})
    assert seen == [url]
    refusing, _ = verifier(lambda _: httpx.Response(403))
    with pytest.raises(WebhookRejected) as refused:
        await refusing.confirm({"SubscribeURL": url})
    assert refused.value.status == 502


def test_sendgrid_signatures():
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = load_sendgrid_key(base64.b64encode(der).decode())
    assert load_sendgrid_key(pem.decode()).public_numbers() == public.public_numbers()
    body, timestamp = b'[{"event":"delivered"}]', "1700000000"
    signature = base64.b64encode(key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256())))
    ok = {"signature": signature.decode(), "timestamp": timestamp}
    assert sendgrid_signature_ok(public, body=body, **ok)
    assert not sendgrid_signature_ok(public, body=body + b" ", **ok)
    assert not sendgrid_signature_ok(public, body=body, signature=ok["signature"], timestamp="1")
    assert not sendgrid_signature_ok(public, body=body, signature="%%%", timestamp=timestamp)
    assert not sendgrid_signature_ok(public, body=body, signature=None, timestamp=timestamp)
    with pytest.raises(ValueError, match="SENDGRID_PUBLIC_KEY"):
        load_sendgrid_key("bm90IGEga2V5")
    rsa_der = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="elliptic"):
        load_sendgrid_key(base64.b64encode(rsa_der).decode())


async def test_production_refuses_unsigned_sendgrid_events() -> None:
    # Nothing past the check is reached, so the webhook needs no database, SNS or rules.
    unused: Any = None
    hooks = Webhooks(
        pool=unused, sns=unused, sendgrid_key=None, rules=unused, unsigned_sendgrid=False
    )
    with pytest.raises(WebhookRejected) as refused:
        await hooks.sendgrid(b'[{"event": "bounce"}]', signature=None, timestamp=None)
    assert (refused.value.status, refused.value.reason) == (403, "unsigned")
