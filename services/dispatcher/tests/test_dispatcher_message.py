"""Messages built the fast way read back exactly like ones built the slow, obvious way.

The reference renders each template from scratch with a fresh Jinja environment, builds an
`email.message.EmailMessage` from the result, and serialises it; both messages are parsed with
the `email` package and compared field by field and body by body.
"""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jinja2.sandbox import SandboxedEnvironment

from dispatcher.dkim_signing import DkimSigner
from dispatcher.message import (
    BuildError,
    EmailPlan,
    Options,
    PlanError,
    Recipient,
    to_header,
    unstructured_header,
)
from dispatcher.relay import stuff
from dispatcher.tokens import TokenMint
from herald.events.campaign import EmailContent
from herald.links import ClickToken, LinkSigner, OpenToken, UnsubscribeToken

KEYS = "k2:second-secret,k1:first-secret"
BASE = "https://mail.example.net"
NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
SIGNER = LinkSigner.from_spec(KEYS)


def plan_for(content: EmailContent, *, kind: str = "campaign", **options: Any) -> EmailPlan:
    return EmailPlan(
        email_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        kind=kind,  # type: ignore[arg-type]
        content=content,
        template_vars={"promo": "SPRING <25%>", "items": ["a", "b"]},
        options=Options(public_base_url=BASE + "/", **options),
        mint=TokenMint(KEYS),
    )


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def _finalize(value: object) -> object:
    return "" if value is None else value


def reference_render(source: str | None, context: dict[str, Any], *, html: bool) -> str | None:
    """A template rendered the obvious way: a fresh sandboxed environment, nothing cached."""
    if source is None:
        return None
    env = SandboxedEnvironment(autoescape=html, finalize=_finalize, keep_trailing_newline=True)
    return env.from_string(source).render(context)


def context_for(plan: EmailPlan, recipient: Recipient) -> dict[str, Any]:
    contact: dict[str, Any] = {"email": recipient.email, "attributes": dict(recipient.attributes)}
    if recipient.first_name is not None:
        contact["first_name"] = recipient.first_name
    if recipient.last_name is not None:
        contact["last_name"] = recipient.last_name
    url = f"{BASE}/unsubscribe/" + SIGNER.sign(
        "unsubscribe", UnsubscribeToken(a=plan.account_id, r=recipient.email, e=plan.email_id)
    )
    return {
        "contact": contact,
        "unsubscribe_url": url,
        "promo": "SPRING <25%>",
        "items": ["a", "b"],
    }


def reference_message(
    plan: EmailPlan, recipient: Recipient, *, html: str | None, mailbox: str | None = None
) -> bytes:
    """The message as `EmailMessage` makes it from the same (already rendered) parts."""
    content = plan.content
    context = context_for(plan, recipient)
    subject = reference_render(content.subject, context, html=False) or ""
    text = reference_render(content.text, context, html=False)
    message = EmailMessage()
    message["Date"] = NOW
    message["From"] = Address(content.from_name or "", addr_spec=content.from_email)
    if content.reply_to:
        message["Reply-To"] = content.reply_to
    name = " ".join(p for p in (recipient.first_name, recipient.last_name) if p)
    message["To"] = Address(" ".join(name.split()), addr_spec=recipient.email)
    message["Subject"] = subject.replace("\r", " ").replace("\n", " ")
    domain = content.from_email.rpartition("@")[2]
    message["Message-ID"] = f"<{recipient.message_id}@{domain}>"
    if plan.kind == "campaign":
        value = f"<{context['unsubscribe_url']}>"
        if mailbox:
            token = context["unsubscribe_url"].rsplit("/", 1)[1]
            value += f", <mailto:{mailbox}?subject=unsubscribe:{token}>"
        message["List-Unsubscribe"] = value
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    if text is not None:
        message.set_content(text)
    if html is not None:
        if text is not None:
            message.add_alternative(html, subtype="html")
        else:
            message.set_content(html, subtype="html")
    if text is None and html is None:
        message.set_content("")
    return message.as_bytes(policy=policy.SMTP)


HEADERS = ("Date", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post")


def rfc2047_address(data: bytes, field: str) -> tuple[str, str]:
    """(display name, address) of a field, decoded as RFC 2047 says.

    Python's structured-header parser puts a space between adjacent encoded words, which RFC
    2047 (6.2) says to drop, so it cannot read back long encoded names, not even its own; the
    legacy decoder does it right.
    """
    raw = message_from_bytes(data)[field]
    value = raw.replace("\r\n", "").replace("\n", "")
    phrase, _, address = value.rpartition("<")
    if not _:
        return "", value.strip()
    name = str(make_header(decode_header(phrase.strip())))
    if name.startswith('"') and name.endswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return name, address.rstrip("> ")


def assert_same(ours_data: bytes, reference_data: bytes, *, subject: str, to_name: str) -> None:
    """Ours reads as the reference does; subject and name as meant (see rfc2047_address)."""
    ours, theirs = parse(ours_data), parse(reference_data)
    for name in HEADERS:
        mine = ours[name]
        reference = theirs[name]
        assert (mine is None) == (reference is None), name
        if mine is not None:
            assert " ".join(str(mine).split()) == " ".join(str(reference).split()), name
    # EmailMessage reads an encoded word out of literal "=?...?=" text; the recipient must not.
    assert str(ours["Subject"]) == subject
    assert rfc2047_address(ours_data, "To") == (to_name, theirs["To"].addresses[0].addr_spec)
    for name in ("From", "Reply-To"):
        mine_addresses = ours[name].addresses if ours[name] is not None else ()
        their_addresses = theirs[name].addresses if theirs[name] is not None else ()
        assert [(a.display_name, a.addr_spec) for a in mine_addresses] == [
            (a.display_name, a.addr_spec) for a in their_addresses
        ], name
    assert ours.get_content_type() == theirs.get_content_type()
    for subtype in ("plain", "html"):
        mine_part = ours.get_body(preferencelist=(subtype,))
        their_part = theirs.get_body(preferencelist=(subtype,))
        assert (mine_part is None) == (their_part is None), subtype
        if mine_part is not None and their_part is not None:
            assert mine_part.get_content_type() == their_part.get_content_type()
            # Line ends compared in their canonical form: the parser leaves CRLF in 8bit parts.
            mine_text = mine_part.get_content().replace("\r\n", "\n")
            assert mine_text == their_part.get_content().replace("\r\n", "\n"), subtype
    assert not ours.defects
    for part in ours.walk():
        assert not part.defects


def expected_headers(plan: EmailPlan, recipient: Recipient) -> dict[str, str]:
    subject = reference_render(plan.content.subject, context_for(plan, recipient), html=False)
    name = " ".join(p for p in (recipient.first_name, recipient.last_name) if p)
    return {
        "subject": (subject or "").replace("\r", " ").replace("\n", " "),
        "to_name": " ".join(name.split()),
    }


def check(plan: EmailPlan, recipient: Recipient, **options: Any) -> None:
    built = plan.build(recipient, now=NOW)
    html = reference_render(plan.content.html, context_for(plan, recipient), html=True)
    reference = reference_message(plan, recipient, html=html, **options)
    assert_same(built.data, reference, **expected_headers(plan, recipient))


CASES = {
    "plain ascii": EmailContent(
        subject="Hello {{ contact.first_name | default('there') }}",
        text="Hi {{ contact.first_name | default('there') }},\n\nUse {{ promo }}.\n",
        html="<html><body><p>Hi {{ contact.first_name }}, use {{ promo }}</p></body></html>",
        from_name="Herald News",
        from_email="news@example.com",
        reply_to="help@example.com",
        track_opens=False,
        track_clicks=False,
    ),
    "unicode everywhere": EmailContent(
        subject="Grüße, {{ contact.first_name }} \u2013 你好 🎉",
        text="Liebe {{ contact.first_name }} {{ contact.last_name }},\nÇa va? Ünïcödé ✓\n",
        html="<p>Grüße <b>{{ contact.first_name }}</b> — 你好世界 🎉</p>",
        from_name="Zoë Ärger, Büro",
        from_email="zoe@example.com",
        track_opens=False,
        track_clicks=False,
    ),
    "mostly not latin": EmailContent(
        subject="{{ contact.attributes.city }}からのお知らせ",
        text="こんにちは、{{ contact.first_name }}さん。\n" * 20,
        from_email="jp@example.com",
        track_opens=False,
        track_clicks=False,
    ),
    "long lines and dots": EmailContent(
        subject="A subject that goes on and on well past the seventy-eight characters a line "
        "should hold, {{ contact.first_name }}, so it has to be folded somewhere sensible",
        text=".leading dot\n..two dots\n.\nFrom here\n--not a boundary\ntrailing spaces   \n"
        + "x" * 1200
        + "\n",
        html="<div>" + "<span>word</span> " * 400 + "</div>\n.\n",
        from_email="long@example.com",
        track_opens=False,
        track_clicks=False,
    ),
    "names that need quoting": EmailContent(
        subject="=?utf-8?q?not_an_encoded_word?= {{ promo }}",
        text="Dear {{ contact.first_name }}\r\nWindows line ends\rand old Mac ones\n",
        from_name='The "Best" Shop, Inc.',
        from_email="shop@example.com",
        track_opens=False,
        track_clicks=False,
    ),
    "html only": EmailContent(
        subject="Only HTML",
        html="<p>{{ contact.attributes.plan }} & <i>{{ promo }}</i></p>",
        from_email="html@example.com",
        track_opens=False,
        track_clicks=False,
    ),
    "static parts": EmailContent(
        subject="Same for everyone",
        text="Nothing personal.\n",
        html="<p>Nothing personal.</p>",
        from_email="static@example.com",
        track_opens=False,
        track_clicks=False,
    ),
}

RECIPIENTS = [
    Recipient(uuid.uuid4(), "ann@example.org", "Ann", "Lee", {"plan": "pro", "city": "大阪"}),
    Recipient(uuid.uuid4(), "bob.o'brien@example.org", "Bob", "O'Brien, Jr.", {}),
    Recipient(uuid.uuid4(), "zoe@example.org", "Zoë", "Çelik", {"plan": "<script>"}),
    Recipient(uuid.uuid4(), "nobody@example.org", None, None, {}),
    Recipient(uuid.uuid4(), "quote@example.org", 'Say "hi"', "\\back", {}),
    Recipient(uuid.uuid4(), "long@example.org", "Maximilian-Alexander " * 4, "Ω", {}),
]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("recipient", RECIPIENTS, ids=lambda r: r.email)
def test_messages_read_back_like_emailmessage_builds_them(case: str, recipient: Recipient):
    content = CASES[case]
    kind = "transactional" if case == "names that need quoting" else "campaign"
    plan = plan_for(content, kind=kind)
    check(plan, recipient)
    built = plan.build(recipient, now=NOW)
    assert built.recipient.address == recipient.email
    assert built.sender.address == content.from_email


def test_every_line_is_within_smtp_limits_and_ends_in_crlf():
    for content in CASES.values():
        plan = plan_for(content)
        for recipient in RECIPIENTS:
            data = plan.build(recipient, now=NOW).data
            assert data.endswith(b"\r\n")
            lines = data.split(b"\r\n")
            assert all(len(line) <= 998 for line in lines)
            assert b"\n" not in data.replace(b"\r\n", b"")
            assert b"\r" not in data.replace(b"\r\n", b"")


def test_headers_stay_short_and_ascii_when_the_text_is_not():
    header = unstructured_header("Subject", "Ω" * 200)
    assert header.isascii()
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    assert str(parse(header + b"\r\n")["Subject"]) == "Ω" * 200
    folded = unstructured_header("Subject", "word " * 40 + "end")
    assert all(len(line) <= 78 for line in folded.split(b"\r\n"))
    assert str(parse(folded + b"\r\n")["Subject"]) == "word " * 40 + "end"
    name = ("Ĳssel Ärger " * 10).strip()
    to = to_header("a@example.com", name)
    assert to.isascii()
    assert all(len(line) <= 78 for line in to.split(b"\r\n"))
    assert rfc2047_address(to + b"\r\n", "To") == (name, "a@example.com")


def test_many_recipients_of_one_plan_get_their_own_exact_message():
    content = CASES["unicode everywhere"]
    plan = plan_for(content)
    for n in range(60):
        recipient = Recipient(
            uuid.uuid4(), f"person{n}@example.org", f"Név{n}", f"Ü{n}", {"plan": str(n)}
        )
        check(plan, recipient)


def test_campaign_mail_offers_one_click_unsubscribe_and_a_mailbox_when_one_is_set():
    plan = plan_for(CASES["plain ascii"], unsubscribe_mailbox="unsub@example.com")
    recipient = RECIPIENTS[0]
    message = parse(plan.build(recipient, now=NOW).data)
    https, mailto = [part.strip(" <>") for part in str(message["List-Unsubscribe"]).split(",")]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert https.startswith(f"{BASE}/unsubscribe/")
    token = SIGNER.verify("unsubscribe", https.rsplit("/", 1)[1], UnsubscribeToken)
    assert token == UnsubscribeToken(a=plan.account_id, r=recipient.email, e=plan.email_id)
    assert mailto == f"mailto:unsub@example.com?subject=unsubscribe:{https.rsplit('/', 1)[1]}"
    check(plan, recipient, mailbox="unsub@example.com")


def test_transactional_and_system_mail_carry_no_list_headers():
    for kind in ("transactional", "system"):
        message = parse(plan_for(CASES["plain ascii"], kind=kind).build(RECIPIENTS[0]).data)
        assert message["List-Unsubscribe"] is None
        assert message["List-Unsubscribe-Post"] is None


def test_message_id_uses_the_record_id_and_the_configured_domain():
    recipient = RECIPIENTS[0]
    default = parse(plan_for(CASES["plain ascii"]).build(recipient).data)
    assert default["Message-ID"] == f"<{recipient.message_id}@example.com>"
    configured = plan_for(CASES["plain ascii"], message_id_domain="mx.herald.test")
    message = parse(configured.build(recipient).data)
    assert message["Message-ID"] == f"<{recipient.message_id}@mx.herald.test>"


def test_return_path_setting_changes_the_envelope_sender_only():
    plan = plan_for(CASES["plain ascii"], return_path="bounces@example.net")
    built = plan.build(RECIPIENTS[0])
    assert built.sender.address == "bounces@example.net"
    assert parse(built.data)["From"].addresses[0].addr_spec == "news@example.com"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("a", "area") and values.get("href") is not None:
            self.hrefs.append(values["href"] or "")
        if tag == "img":
            self.images.append(values.get("src") or "")


def links_of(html: str) -> _Links:
    parser = _Links()
    parser.feed(html)
    parser.close()
    return parser


TRACKED_HTML = """<!doctype html><html><body>
<p>Hi {{ contact.first_name }}</p>
<a href="https://example.com/a?x=1&amp;y=2">one</a>
<A HREF='http://example.com/B'>two</A>
<a class="btn" href=https://example.com/c>three</a>
<a href="mailto:help@example.com">mail</a> <a href="#top">top</a>
<a href="ftp://example.com/file">ftp</a>
<a data-href="https://example.com/no" href="/relative">rel</a>
<area shape="rect" href="https://example.com/map">
<link rel="stylesheet" href="https://example.com/style.css">
<a href="https://example.com/a?x=1&amp;y=2">one again</a>
<a href="{{ unsubscribe_url }}">Unsubscribe</a>
<a href="https://example.com/p/{{ contact.attributes.plan }}">plan</a>
</BODY></html>
"""


def test_links_are_rewritten_to_signed_click_urls_and_a_pixel_is_added():
    content = EmailContent(subject="s", html=TRACKED_HTML, from_email="t@example.com")
    plan = plan_for(content)
    recipient = RECIPIENTS[0]
    ours = parse(plan.build(recipient).data).get_body(preferencelist=("html",))
    assert ours is not None
    html = ours.get_content().replace("\r\n", "\n")
    original = reference_render(TRACKED_HTML, context_for(plan, recipient), html=True) or ""
    before, after = links_of(original), links_of(html)
    assert len(before.hrefs) == len(after.hrefs)
    unsubscribe = context_for(plan, recipient)["unsubscribe_url"]
    index = 0
    for old, new in zip(before.hrefs, after.hrefs, strict=True):
        if old.startswith(("http://", "https://")) and old != unsubscribe:
            assert new.startswith(f"{BASE}/t/c/"), old
            token = SIGNER.verify("click", new.rsplit("/", 1)[1], ClickToken)
            assert token == ClickToken(
                m=str(recipient.message_id), e=plan.email_id, a=plan.account_id, i=index, u=old
            )
            index += 1
        else:
            assert new == old
    assert index == 6
    assert before.images == []
    assert len(after.images) == 1
    pixel = after.images[0]
    assert pixel.startswith(f"{BASE}/t/o/")
    opened = SIGNER.verify("open", pixel.rsplit("/", 1)[1], OpenToken)
    assert opened == OpenToken(m=str(recipient.message_id), e=plan.email_id, a=plan.account_id)
    assert f'<img src="{pixel}" width="1" height="1" alt=""></BODY>' in html
    # Apart from the rewritten hrefs and the pixel, not one character changed.
    restored = html.replace(f'<img src="{pixel}" width="1" height="1" alt="">', "")
    for old, new in zip(before.hrefs, after.hrefs, strict=True):
        if old != new:
            raw = old.replace("&", "&amp;")
            restored = restored.replace(new, raw, 1)
    assert restored == original


def test_tracking_can_be_turned_off_separately():
    no_clicks = EmailContent(
        subject="s", html=TRACKED_HTML, from_email="t@example.com", track_clicks=False
    )
    html = parse(plan_for(no_clicks).build(RECIPIENTS[0]).data).get_body(("html",))
    assert html is not None
    found = links_of(html.get_content())
    assert not any(h.startswith(f"{BASE}/t/") for h in found.hrefs)
    assert len(found.images) == 1
    no_opens = EmailContent(
        subject="s", html=TRACKED_HTML, from_email="t@example.com", track_opens=False
    )
    html = parse(plan_for(no_opens).build(RECIPIENTS[0]).data).get_body(("html",))
    assert html is not None
    found = links_of(html.get_content())
    assert sum(h.startswith(f"{BASE}/t/c/") for h in found.hrefs) == 6
    assert found.images == []


def test_the_pixel_goes_at_the_end_when_there_is_no_body_tag():
    content = EmailContent(subject="s", html="<p>bare</p>", from_email="t@example.com")
    html = parse(plan_for(content).build(RECIPIENTS[0]).data).get_body(("html",))
    assert html is not None
    text = html.get_content()
    assert text.startswith("<p>bare</p><img src=")
    assert text.rstrip().endswith('alt="">')


def test_a_template_that_does_not_parse_condemns_the_email():
    with pytest.raises(PlanError, match="template error"):
        plan_for(EmailContent(subject="{% if %}", text="x", from_email="a@example.com"))
    with pytest.raises(PlanError, match="from address"):
        plan_for(EmailContent(subject="s", text="x", from_email="not an address"))


def test_a_template_that_fails_for_one_recipient_fails_only_that_message():
    content = EmailContent(
        subject="s",
        text="{{ 10 // contact.attributes.n }}",
        from_email="a@example.com",
    )
    plan = plan_for(content)
    ok = Recipient(uuid.uuid4(), "ok@example.org", attributes={"n": 5})
    assert "2" in parse(plan.build(ok).data).get_content()
    with pytest.raises(BuildError, match="text template error"):
        plan.build(Recipient(uuid.uuid4(), "zero@example.org", attributes={"n": 0}))
    sandboxed = plan_for(
        EmailContent(subject="{{ ''.__class__.__mro__ }}", text="x", from_email="a@example.com")
    )
    with pytest.raises(BuildError, match="subject template error"):
        sandboxed.build(ok)


def test_smtp_dot_stuffing():
    assert stuff(b"a\r\n.b\r\n..c\r\n.\r\n") == b"a\r\n..b\r\n...c\r\n..\r\n"


@pytest.fixture(scope="module")
def dkim_key() -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def test_dkim_signatures_verify_with_dkimpy(dkim_key: tuple[str, bytes]):
    pem, record = dkim_key
    signer = DkimSigner(domain="example.com", selector="herald", private_key_pem=pem)
    looked_up: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes:
        looked_up.append(name)
        return record if name == b"herald._domainkey.example.com." else b""

    for case in ("plain ascii", "unicode everywhere", "long lines and dots"):
        content = CASES[case].model_copy(update={"track_clicks": True, "track_opens": True})
        plan = EmailPlan(
            email_id=uuid.uuid4(),
            account_id=uuid.uuid4(),
            kind="campaign",
            content=content,
            template_vars={},
            options=Options(public_base_url=BASE),
            mint=TokenMint(KEYS),
            dkim=signer,
        )
        data = plan.build(RECIPIENTS[2]).data
        assert data.startswith(b"DKIM-Signature: ")
        assert dkim.verify(data, dnsfunc=dns), case
        fields = dkim.util.parse_tag_value(parse(data)["DKIM-Signature"].encode())
        signed = fields[b"h"].split(b":")
        for name in (b"from", b"to", b"subject", b"list-unsubscribe", b"list-unsubscribe-post"):
            assert name in signed
        # Tampering with a signed header breaks the signature.
        assert not dkim.verify(data.replace(b"Subject: ", b"Subject: Re: ", 1), dnsfunc=dns)
    assert looked_up


def test_mail_from_other_domains_is_not_signed(dkim_key: tuple[str, bytes]):
    signer = DkimSigner(domain="example.net", selector="s", private_key_pem=dkim_key[0])
    assert signer.covers("news.example.net")
    assert not signer.covers("example.com")
    plan = EmailPlan(
        email_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        kind="campaign",
        content=CASES["plain ascii"],
        template_vars={},
        options=Options(public_base_url=BASE),
        mint=TokenMint(KEYS),
        dkim=signer,
    )
    assert not plan.build(RECIPIENTS[0]).data.startswith(b"DKIM-Signature")


def test_dkim_refuses_keys_that_are_not_rsa():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ValueError, match="RSA"):
        DkimSigner(domain="example.com", selector="s", private_key_pem=pem)


def test_parts_do_not_see_each_others_assignments_and_globals_work():
    content = EmailContent(
        subject="{% set secret = 'S' %}{{ secret }}{% for i in range(2) %}{{ i }}{% endfor %}",
        text="{{ secret | default('none') }} {{ items | join(',') }}",
        html="<p>{{ secret | default('none') }}</p>",
        from_email="a@example.com",
        track_opens=False,
    )
    plan = plan_for(content)
    for _ in range(2):  # the shared context stays untouched between messages, too
        message = parse(plan.build(RECIPIENTS[0]).data)
        assert str(message["Subject"]) == "S01"
        text = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        assert text is not None
        assert html is not None
        assert text.get_content().strip() == "none a,b"
        assert html.get_content().strip() == "<p>none</p>"
