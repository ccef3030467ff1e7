"""Proof that a webhook call comes from its provider: SNS message signatures, SendGrid's ECDSA.

SNS signs each message with an RSA key whose certificate it serves over HTTPS from its regional
endpoint; the certificate is fetched from `SigningCertURL` only when that URL is on an allowed
host (`sns.<region>.amazonaws.com`), and cached. A valid signature proves AWS sent the message,
not that it is ours: `SES_TOPIC_ARNS` limits which topics are accepted. SendGrid signs the
timestamp header followed by the raw body with ECDSA P-256 / SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


class WebhookRejected(Exception):
    """A webhook call refused: `status` to answer with, `reason` a short code for metrics."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


_SUBSCRIPTION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
SNS_SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": _SUBSCRIPTION_FIELDS,
    "UnsubscribeConfirmation": _SUBSCRIPTION_FIELDS,
}
_SNS_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The canonical text SNS signs: named fields in order, each `name\\nvalue\\n`."""
    fields = SNS_SIGNED_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise WebhookRejected(400, "unknown_type", "not an SNS message type we handle")
    parts = []
    for name in fields:
        value = message.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise WebhookRejected(400, "malformed", f"SNS message without {name}")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode()


class SnsVerifier:
    """Verifies SNS messages and confirms subscriptions, over one HTTP client."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        host_pattern: str,
        topics: frozenset[str] = frozenset(),
        max_certificates: int = 64,
    ) -> None:
        self._http = http
        self._hosts = re.compile(host_pattern)
        self._topics = topics
        self._max = max_certificates
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()

    def allowed_url(self, url: object) -> bool:
        """Whether `url` is HTTPS on an SNS host (so fetching it cannot be aimed elsewhere)."""
        if not isinstance(url, str):
            return False
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        return (
            parts.scheme == "https"
            and parts.hostname is not None
            and parts.username is None
            and self._hosts.fullmatch(parts.hostname) is not None
        )

    async def _certificate(self, url: str) -> x509.Certificate:
        cached = self._certificates.get(url)
        if cached is not None:
            return cached
        try:
            response = await self._http.get(url, timeout=5, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise WebhookRejected(
                503, "certificate_unavailable", f"cannot fetch the signing certificate: {exc!r}"
            ) from None
        if response.status_code != 200:
            raise WebhookRejected(
                503,
                "certificate_unavailable",
                f"the signing certificate URL answered {response.status_code}",
            )
        try:
            certificate = x509.load_pem_x509_certificate(response.content)
        except ValueError:
            raise WebhookRejected(
                403, "bad_certificate", "the signing certificate is not a PEM certificate"
            ) from None
        self._certificates[url] = certificate
        if len(self._certificates) > self._max:
            self._certificates.popitem(last=False)
        return certificate

    async def verify(self, message: Mapping[str, Any]) -> None:
        """Return if `message` is signed by SNS for an accepted topic; WebhookRejected if not."""
        signed = sns_string_to_sign(message)
        algorithm = _SNS_HASHES.get(str(message.get("SignatureVersion")))
        if algorithm is None:
            raise WebhookRejected(403, "signature", "unknown SNS signature version")
        cert_url = message.get("SigningCertURL") or message.get("SigningCertUrl")
        if not self.allowed_url(cert_url):
            raise WebhookRejected(403, "certificate_host", "signing certificate not from SNS")
        assert isinstance(cert_url, str)
        try:
            signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise WebhookRejected(403, "signature", "the signature is not base64") from None
        certificate = await self._certificate(cert_url)
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise WebhookRejected(403, "bad_certificate", "the signing certificate has expired")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise WebhookRejected(403, "bad_certificate", "the signing key is not RSA")
        try:
            key.verify(signature, signed, padding.PKCS1v15(), algorithm())
        except InvalidSignature:
            raise WebhookRejected(403, "signature", "the SNS signature does not match") from None
        if self._topics and message.get("TopicArn") not in self._topics:
            raise WebhookRejected(403, "topic", "notifications of this topic are not accepted")

    async def confirm(self, message: Mapping[str, Any]) -> None:
        """Confirm a subscription by visiting its SubscribeURL (an SNS host only)."""
        url = message.get("SubscribeURL")
        if not self.allowed_url(url):
            raise WebhookRejected(403, "subscribe_url", "SubscribeURL is not an SNS endpoint")
        assert isinstance(url, str)
        try:
            response = await self._http.get(url, timeout=10, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise WebhookRejected(
                502, "confirmation_failed", f"confirming the subscription failed: {exc!r}"
            ) from None
        if response.status_code >= 300:
            raise WebhookRejected(
                502,
                "confirmation_failed",
                f"SNS answered {response.status_code} to the confirmation",
            )


def load_sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key, as shown in its settings (base64 DER) or as PEM."""
    stripped = text.strip()
    try:
        if "BEGIN PUBLIC KEY" in stripped:
            key = serialization.load_pem_public_key(stripped.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(stripped, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"SENDGRID_PUBLIC_KEY is not a public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("SENDGRID_PUBLIC_KEY must be an elliptic-curve (ECDSA) key")
    return key


def sendgrid_signature_ok(
    key: ec.EllipticCurvePublicKey, *, signature: str | None, timestamp: str | None, body: bytes
) -> bool:
    """Whether SendGrid signed `timestamp` + `body` (the signature header is base64 DER)."""
    if not signature or not timestamp:
        return False
    try:
        key.verify(
            base64.b64decode(signature, validate=True),
            timestamp.encode() + body,
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True
