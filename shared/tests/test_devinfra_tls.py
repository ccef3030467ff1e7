"""Unit tests of the development certificate: made once, private key private, trusted by its CA."""

import contextlib
import ssl
import stat

from cryptography import x509

from herald.devinfra.tls import development_certificate


def test_a_certificate_for_loopback_is_made_once_and_reused(tmp_path):
    cert, key = development_certificate(tmp_path / "tls")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    before = cert.read_bytes()
    assert development_certificate(tmp_path / "tls") == (cert, key)
    assert cert.read_bytes() == before


def test_the_written_ca_verifies_the_certificate(tmp_path):
    cert, key = development_certificate(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    back_in, back_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(back_in, outgoing, server_hostname="127.0.0.1")
    server_side = server.wrap_bio(incoming, back_out, server_side=True)
    for _ in range(10):
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        incoming.write(outgoing.read())
        back_in.write(back_out.read())
    peer = client_side.getpeercert()
    assert peer is not None
    assert peer["subjectAltName"]


def test_an_unreadable_certificate_is_replaced(tmp_path):
    cert, _ = development_certificate(tmp_path)
    cert.write_bytes(b"not a certificate")
    development_certificate(tmp_path)
    assert x509.load_pem_x509_certificates(cert.read_bytes())
