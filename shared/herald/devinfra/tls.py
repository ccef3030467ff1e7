"""A local development certificate for the gateway's HTTPS listener.

`make run` (herald.devinfra) calls `development_certificate` once per data directory: a
private certificate authority (trustme) issues a certificate for 127.0.0.1, ::1 and localhost.
The CA certificate is written beside it (`ca.pem`) so clients can trust it (`curl --cacert
.data/tls/ca.pem`) without trusting anything else; the files are kept and reused while they
are valid.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import trustme
from cryptography import x509

NAMES = ("127.0.0.1", "::1", "localhost")
_MIN_LIFETIME = datetime.timedelta(days=7)


def _still_valid(cert: Path, key: Path, ca: Path) -> bool:
    if not (cert.is_file() and key.is_file() and ca.is_file()):
        return False
    try:
        loaded = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (ValueError, IndexError):
        return False
    expires = loaded.not_valid_after_utc
    return expires - datetime.datetime.now(datetime.UTC) > _MIN_LIFETIME


def development_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate chain, private key) for local HTTPS, made once under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    if _still_valid(cert, key, ca_file):
        return cert, key
    ca = trustme.CA(organization_name="Herald development CA")
    issued = ca.issue_cert(*NAMES, organization_name="Herald development")
    ca.cert_pem.write_to_path(str(ca_file))
    # Created private from the start: never readable by others, not even briefly.
    descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(issued.private_key_pem.bytes())
    # Leaf first, then the CA: a client given only the CA can build the chain.
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return cert, key
