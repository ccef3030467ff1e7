"""Stand-ins for what is out of reach here: SNS's certificate and subscription endpoints (a local
HTTPS server with a test CA), and a tracking service in this process with settings of our own."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import trustme
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herald.devinfra.process import free_port
from herald.devinfra.stack import Stack
from tracking.app import create_app
from tracking.config import Settings
from tracking.signatures import sns_string_to_sign

TOPIC = "arn:aws:sns:eu-west-1:123456789012:herald-ses"


def _signing_certificate() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, certificate.public_bytes(serialization.Encoding.PEM)


@dataclass
class FakeSns:
    """Serves the signing certificate and records subscription confirmations, over HTTPS."""

    port: int
    ca_file: Path
    key: rsa.RSAPrivateKey
    confirmations: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def sign(self, message: dict[str, Any], *, version: str = "2") -> dict[str, Any]:
        """`message` as SNS would post it: signed, with the certificate's URL."""
        signed = {
            "SignatureVersion": version,
            "SigningCertURL": f"{self.base}/SimpleNotificationService-test.pem",
            **message,
        }
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303
        signature = self.key.sign(sns_string_to_sign(signed), padding.PKCS1v15(), algorithm)
        signed["Signature"] = base64.b64encode(signature).decode()
        return signed

    def notification(self, ses: Mapping[str, Any], *, topic: str = TOPIC) -> dict[str, Any]:
        """A signed SNS Notification carrying an SES notification."""
        return self.sign(
            {
                "Type": "Notification",
                "MessageId": str(uuid.uuid4()),
                "TopicArn": topic,
                "Message": orjson.dumps(ses).decode(),
                "Timestamp": datetime.now(UTC).isoformat(),
            }
        )


@contextlib.asynccontextmanager
async def fake_sns() -> AsyncIterator[FakeSns]:
    """The fake SNS endpoints, served until the block ends."""
    key, certificate = _signing_certificate()
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    directory = Path(tempfile.mkdtemp(prefix="herald-sns-"))
    ca_file, chain, private = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_cert.private_key_pem.write_to_path(str(private))
    server_cert.cert_chain_pems[0].write_to_path(str(chain))
    sns = FakeSns(port=free_port(), ca_file=ca_file, key=key)

    async def pem(_: Request) -> Response:
        return Response(certificate, media_type="application/x-pem-file")

    async def confirm(request: Request) -> Response:
        sns.confirmations.append(request.query_params.get("Token", ""))
        return Response("<ConfirmSubscriptionResponse/>", media_type="text/xml")

    app = Starlette(
        routes=[
            Route("/SimpleNotificationService-test.pem", pem),
            Route("/confirm", confirm),
        ]
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=sns.port,
        ssl_certfile=str(chain),
        ssl_keyfile=str(private),
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield sns
    finally:
        server.should_exit = True
        await task


def sendgrid_keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A signing key and its public half as SendGrid shows it (base64 DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, base64.b64encode(public).decode()


def sendgrid_headers(key: ec.EllipticCurvePrivateKey, body: bytes) -> dict[str, str]:
    timestamp = str(int(datetime.now(UTC).timestamp()))
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "Content-Type": "application/json",
    }


def settings(stack: Stack, **overrides: Any) -> Settings:
    """A tracking service like the platform's, serving HTTP only (the platform's consumes)."""
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": stack.database_url,
        "kafka_bootstrap_servers": stack.kafka_bootstrap_servers,
        "link_signing_keys": stack.secrets["LINK_SIGNING_KEYS"],
        "internal_token": stack.secrets["INTERNAL_TOKEN"],
        "auth_url": stack.url("auth"),
        "run_consumers": False,
        "kafka_session_timeout_ms": 2000,
    }
    return Settings(**(values | overrides))


@contextlib.asynccontextmanager
async def tracking_in_process(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The tracking app with `config`, started and stopped (gracefully) around the block."""
    app = create_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tracking.test"
        ) as client,
    ):
        yield client
