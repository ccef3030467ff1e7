"""Building each recipient's message: what is common to an email once, the rest per recipient.

`EmailPlan.prepare` does the per-email work: it parses the templates, renders and encodes the
parts that do not depend on the recipient, formats From and Reply-To, and lays out the MIME
skeleton (headers, boundary, part headers) as bytes. `EmailPlan.build` then fills the slots of
one recipient: Date, To, Subject, Message-ID, List-Unsubscribe, and the bodies (rendered, links
rewritten to signed tracking URLs, open pixel added, transfer-encoded), and signs with DKIM.
Python's `email.message.EmailMessage` would take milliseconds per message; this takes tens of
microseconds, and the unit tests hold its output, parsed back by the `email` package, to what
`EmailMessage` makes of the same input.

The result is the message with CRLF line ends and without SMTP dot-stuffing (the relay
connection does that), as DKIM needs to sign it.
"""

from __future__ import annotations

import binascii
import html as htmllib
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Literal

from dispatcher.dkim_signing import DkimSigner
from dispatcher.domain import InvalidAddress, Mailbox, domain_of, mailbox
from dispatcher.tokens import EmailTokens, TokenMint, message_part
from herald.events.campaign import EmailContent
from herald.templates import TemplateProblem, compile_template, render_context

Kind = Literal["campaign", "transactional", "system"]


class PlanError(ValueError):
    """The email itself cannot be sent (a template that does not parse, a bad From)."""


class BuildError(ValueError):
    """This recipient's message cannot be built (its template rendering failed)."""


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient's part of a message: who, and what personalises it."""

    message_id: uuid.UUID
    email: str
    first_name: str | None = None
    last_name: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Built:
    """A message ready for the relay: its envelope and its bytes."""

    sender: Mailbox
    recipient: Mailbox
    data: bytes


@dataclass(frozen=True)
class Options:
    """What the service's settings decide about every message."""

    public_base_url: str
    message_id_domain: str | None = None
    unsubscribe_mailbox: str | None = None
    return_path: str | None = None


# -- body encoding ------------------------------------------------------------------------

# Printable ASCII, tab and line feed: what a 7bit part may carry as it is.
_PLAIN_BYTES = bytes([9, 10, *range(32, 127)])
_ASCII = bytes(range(128))


def _encode_body(text: str, boundary: bytes) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding, CRLF body ending in CRLF) for a text part.

    ASCII with short lines travels as is (7bit); mostly-ASCII text as quoted-printable, other
    text as base64, as `EmailMessage` chooses. Neither encoding can produce `=_`, which every
    boundary of ours contains, so only the 7bit case has to be checked for the boundary.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    data = text.encode("utf-8", "replace")
    if (
        not data.translate(None, _PLAIN_BYTES)
        and (len(data) < 999 or max(map(len, data.split(b"\n"))) < 999)
        and boundary not in data
    ):
        return b"7bit", data.replace(b"\n", b"\r\n")
    non_ascii = len(data.translate(None, _ASCII))
    if non_ascii * 4 > len(data):
        encoded = binascii.b2a_base64(data, newline=False)
        lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
        return b"base64", b"\r\n".join(lines) + b"\r\n"
    return b"quoted-printable", binascii.b2a_qp(data.replace(b"\n", b"\r\n"), istext=True)


# -- header encoding ----------------------------------------------------------------------

_PLAIN_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/^_`{|}~]+)*")
_UNSAFE_HEADER_TEXT = re.compile(r"[\x00-\x1f\x7f]|=\?")
_MAX_WORD_BYTES = 45  # 60 base64 characters: an encoded word stays within 75 characters


def _encoded_words(text: str, first_line_used: int = 0) -> list[str]:
    """RFC 2047 `=?utf-8?b?...?=` words for `text`, never splitting a character.

    Each word fits a 78-character line after a space; the first shares its line with the
    `first_line_used` characters before it (the field name).
    """
    data = text.encode("utf-8", "replace")
    chunks = []
    start = 0
    room = min(_MAX_WORD_BYTES, max((78 - first_line_used - 12) // 4 * 3, 3))
    while len(data) - start > room:
        end = start + room
        while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: cut before its character
            end -= 1
        chunks.append(data[start:end])
        start = end
        room = _MAX_WORD_BYTES
    chunks.append(data[start:])
    return [f"=?utf-8?b?{binascii.b2a_base64(c, newline=False).decode()}?=" for c in chunks]


def _fold_ascii(name: str, value: str) -> str:
    """`Name: value`, broken before spaces so that lines stay within 78 characters if they can."""
    line = f"{name}: {value}"
    if len(line) <= 78:
        return line
    lines = []
    start = 0
    while len(line) - start > 78:
        cut = line.rfind(" ", start + 1, start + 78)
        if cut <= start + len(name) + 1:
            cut = line.find(" ", start + 78)
            if cut == -1:
                break
        lines.append(line[start:cut])
        start = cut
    lines.append(line[start:])
    return "\r\n".join(lines)


def unstructured_header(name: str, value: str) -> bytes:
    """A header field with free text (Subject), RFC 2047-encoded when not plain ASCII."""
    if value.isascii() and not _UNSAFE_HEADER_TEXT.search(value) and value == value.strip():
        return (_fold_ascii(name, value) + "\r\n").encode()
    words = _encoded_words(value, len(name) + 2)
    return (f"{name}: " + "\r\n ".join(words) + "\r\n").encode()


def _display_name(first_name: str | None, last_name: str | None) -> str:
    name = " ".join(part for part in (first_name, last_name) if part)
    return " ".join(name.split())[:200]


def to_header(address: str, display_name: str) -> bytes:
    """`To: Name <address>`, the name quoted or encoded as it needs."""
    if not display_name:
        return f"To: {address}\r\n".encode()
    if display_name.isascii():
        if _PLAIN_PHRASE.fullmatch(display_name):
            phrase = display_name
        else:
            escaped = display_name.replace("\\", "\\\\").replace('"', '\\"')
            phrase = f'"{escaped}"'
        return f"To: {phrase} <{address}>\r\n".encode()
    words = "\r\n ".join(_encoded_words(display_name, len("To: ")))
    return f"To: {words}\r\n <{address}>\r\n".encode()


def _address_header(name: str, display_name: str | None, address: str) -> bytes:
    """A From or Reply-To field, formatted once per email by the `email` package itself."""
    try:
        value = Address(display_name=display_name or "", addr_spec=address)
        message = EmailMessage(policy=policy.SMTP if address.isascii() else policy.SMTPUTF8)
        message[name] = value
        raw = message.as_bytes()
    except (ValueError, IndexError, TypeError) as exc:
        raise PlanError(f"{name} address {address!r} is not valid: {exc}") from None
    return raw.removesuffix(b"\r\n")


_date_cache: tuple[int, bytes] = (0, b"")


def date_header(now: datetime) -> bytes:
    """`Date:` for `now` (the formatted second is reused by every message sent within it)."""
    global _date_cache
    second = int(now.timestamp())
    if _date_cache[0] != second:
        stamp = format_datetime(datetime.fromtimestamp(second, UTC))
        _date_cache = (second, f"Date: {stamp}\r\n".encode())
    return _date_cache[1]


# -- HTML: links and the open pixel -------------------------------------------------------

# The literal "href" first lets the regex engine skip ahead with a fast substring search.
_HREF = re.compile(r"""href\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+))""")
_HREF_ANY_CASE = re.compile(_HREF.pattern, re.IGNORECASE)
_UNSEEN = "\x00unseen"
_MAX_REMEMBERED_LINKS = 2000
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def _link_target(raw: str, *, unsubscribe_url: str, own_prefix: str) -> str | None:
    """Where an href goes if it is a link to rewrite: http(s), not ours, not unsubscribing."""
    if "&" in raw:
        # Autoescaped query strings carry only &amp;; anything else takes the full decoder.
        plain = raw.replace("&amp;", "")
        url = raw.replace("&amp;", "&") if "&" not in plain else htmllib.unescape(raw)
    else:
        url = raw
    url = url.strip()
    scheme = url[:8].lower()
    if not (scheme.startswith("http://") or scheme.startswith("https://")):
        return None
    if url == unsubscribe_url or url.startswith(own_prefix):
        return None
    return url


def _hrefs(html: str) -> list[tuple[int, int, str]]:
    """(start, end, value) of each href attribute of an `<a>` or `<area>` tag in `html`."""
    mixed_case = html.count("href") != html.lower().count("href")
    found = []
    for match in (_HREF_ANY_CASE if mixed_case else _HREF).finditer(html):
        start = match.start()
        if start == 0 or not html[start - 1].isspace():
            continue  # part of another attribute's name (data-href)
        tag_start = html.rfind("<", 0, start)
        if tag_start < 0 or html.find(">", tag_start, start) >= 0:
            continue  # not inside a tag
        tag = html[tag_start + 1 : tag_start + 6].lower()
        if not ((tag[0] == "a" and tag[1].isspace()) or (tag[:4] == "area" and tag[4].isspace())):
            continue
        group = 1 if match.start(1) >= 0 else 2 if match.start(2) >= 0 else 3
        found.append((match.start(group), match.end(group), match.group(group)))
    return found


def _pixel_position(html: str) -> int:
    position = html.rfind("</body>")
    if position >= 0:
        return position
    ends = [match.start() for match in _BODY_END.finditer(html)]
    return ends[-1] if ends else len(html)


# -- the plan -----------------------------------------------------------------------------


@dataclass
class _Part:
    """One text part: its template, or its encoded bytes when it does not vary."""

    subtype: Literal["plain", "html"]
    template: Any
    static: str | None  # the rendered text when the template has no template syntax
    static_encoded: bytes | None = None  # the part's headers and body, when fully fixed


def _is_static(source: str) -> bool:
    return "{{" not in source and "{%" not in source and "{#" not in source


class EmailPlan:
    """One email's messages, prepared once and built per recipient."""

    def __init__(
        self,
        *,
        email_id: uuid.UUID,
        account_id: uuid.UUID,
        kind: Kind,
        content: EmailContent,
        template_vars: Mapping[str, Any],
        options: Options,
        mint: TokenMint,
        dkim: DkimSigner | None = None,
    ) -> None:
        self.email_id = email_id
        self.account_id = account_id
        self.kind = kind
        self.content = content
        self._vars = dict(template_vars)
        self._base = options.public_base_url.rstrip("/")
        self._mint = mint
        self._tokens: EmailTokens = mint.for_email(email_id=email_id, account_id=account_id)
        self._own_prefix = self._base + "/t/"
        self._link_targets: dict[str, str | None] = {}
        self._unsubscribe_mailbox = options.unsubscribe_mailbox

        try:
            sender = mailbox(options.return_path or content.from_email)
            from_box = mailbox(content.from_email)
        except InvalidAddress as exc:
            raise PlanError(f"from address {content.from_email!r}: {exc}") from None
        self.sender = sender
        from_domain = domain_of(from_box.address)
        self._message_id_suffix = f"@{options.message_id_domain or from_domain}>\r\n".encode()
        self._dkim = dkim if dkim is not None and dkim.covers(from_domain) else None

        try:
            self._subject = compile_template("subject", content.subject)
            parts = []
            if content.text is not None:
                parts.append(_Part("plain", compile_template("text", content.text), None))
            if content.html is not None:
                parts.append(_Part("html", compile_template("html", content.html), None))
        except TemplateProblem as exc:
            raise PlanError(f"template error: {exc}") from None
        if not parts:
            parts = [_Part("plain", compile_template("text", ""), None)]
        # Both environments (escaping and not) carry the same default globals.
        self._globals = dict(self._subject.environment.globals)
        self._static_subject: bytes | None = None
        if _is_static(content.subject):
            rendered = self._subject.render({}).replace("\r", " ").replace("\n", " ")
            self._static_subject = unstructured_header("Subject", rendered)

        self._boundary = f"=_herald_{secrets.token_hex(12)}".encode()
        self._track_clicks = content.track_clicks
        self._track_opens = content.track_opens
        for part in parts:
            source = content.text if part.subtype == "plain" else content.html
            if source is not None and _is_static(source):
                part.static = part.template.render({})
                if part.subtype == "plain" or not (self._track_clicks or self._track_opens):
                    part.static_encoded = self._encode_part(part.subtype, part.static)
        self._parts = parts

        # Domains in ASCII (IDNA) in the headers too, so that only a non-ASCII local part
        # makes a message need SMTPUTF8.
        head = _address_header("From", content.from_name, from_box.address)
        if content.reply_to:
            try:
                reply_to = mailbox(content.reply_to).address
            except InvalidAddress as exc:
                raise PlanError(f"reply-to address {content.reply_to!r}: {exc}") from None
            head += _address_header("Reply-To", None, reply_to)
        self._head = head + b"MIME-Version: 1.0\r\n"
        if len(parts) > 1:
            self._content_type = (
                b'Content-Type: multipart/alternative; boundary="' + self._boundary + b'"\r\n\r\n'
            )
        else:
            self._content_type = b""

    def _encode_part(self, subtype: str, text: str) -> bytes:
        cte, body = _encode_body(text, self._boundary)
        return (
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n'.encode()
            + b"Content-Transfer-Encoding: "
            + cte
            + b"\r\n\r\n"
            + body
        )

    def unsubscribe_url(self, recipient: str) -> str:
        """The signed one-click unsubscribe link of `recipient` for this email."""
        return f"{self._base}/unsubscribe/{self._tokens.unsubscribe(recipient)}"

    def build(self, recipient: Recipient, *, now: datetime | None = None) -> Built:
        """The message for one recipient, or BuildError if its templates cannot render."""
        try:
            rcpt = mailbox(recipient.email)
        except InvalidAddress as exc:
            raise BuildError(f"recipient {recipient.email!r}: {exc}") from None
        message_id = str(recipient.message_id)
        unsubscribe_url = self.unsubscribe_url(recipient.email)

        context: dict[str, Any] | None = None
        subject = self._static_subject
        if subject is None:
            context = self._context(recipient, unsubscribe_url)
            subject = unstructured_header(
                "Subject", self._render("subject", self._subject, context)
            )

        bodies = []
        for part in self._parts:
            if part.static_encoded is not None:
                bodies.append(part.static_encoded)
                continue
            if part.static is not None:
                text = part.static
            else:
                if context is None:
                    context = self._context(recipient, unsubscribe_url)
                text = self._render(
                    "html" if part.subtype == "html" else "text", part.template, context
                )
            if part.subtype == "html":
                text = self._track(text, message_id, unsubscribe_url)
            bodies.append(self._encode_part(part.subtype, text))

        head = [
            date_header(now or datetime.now(UTC)),
            self._head,
            to_header(rcpt.address, _display_name(recipient.first_name, recipient.last_name)),
            subject,
            b"Message-ID: <",
            message_id.encode(),
            self._message_id_suffix,
        ]
        if self.kind == "campaign":
            head.append(self._list_unsubscribe(unsubscribe_url))
        head.append(self._content_type)
        if len(bodies) == 1:
            head.append(bodies[0])
        else:
            # The CRLF before a delimiter belongs to it: each body keeps its own last line end.
            head += (b"--", self._boundary, b"\r\n", bodies[0])
            for body in bodies[1:]:
                head += (b"\r\n--", self._boundary, b"\r\n", body)
            head += (b"\r\n--", self._boundary, b"--\r\n")
        data = b"".join(head)
        if self._dkim is not None:
            data = self._dkim.sign(data) + data
        return Built(sender=self.sender, recipient=rcpt, data=data)

    def _context(self, recipient: Recipient, unsubscribe_url: str) -> dict[str, Any]:
        """The recipient's template context, over the template globals (see `_render`)."""
        context = render_context(
            email=recipient.email,
            first_name=recipient.first_name,
            last_name=recipient.last_name,
            attributes=recipient.attributes,
            unsubscribe_url=unsubscribe_url,
            template_vars=self._vars,
        )
        return {**self._globals, **context}

    @staticmethod
    def _render(part: str, template: Any, context: Mapping[str, Any]) -> str:
        try:
            # What Template.render does, less copying the context (and globals) into a new
            # dict for each of the three parts: the context is shared, read-only to templates
            # (their own assignments land in the render's own namespace).
            rendered: str = template.environment.concat(
                template.root_render_func(template.new_context(context, shared=True))
            )
        except Exception as exc:
            # A sandbox refusal, a filter raising, a bad attribute: this recipient's data.
            raise BuildError(f"{part} template error: {type(exc).__name__}: {exc}") from None
        if part == "subject":
            rendered = rendered.replace("\r", " ").replace("\n", " ")
        return rendered

    def _track(self, html: str, message_id: str, unsubscribe_url: str) -> str:
        if not (self._track_clicks or self._track_opens):
            return html
        m_part = message_part(message_id)
        pieces: list[str] = []
        cursor = 0
        if self._track_clicks:
            index = 0
            for start, end, raw in _hrefs(html):
                if raw == unsubscribe_url:
                    continue
                # The same links come back in every message of an email: decide each once.
                url = self._link_targets.get(raw, _UNSEEN)
                if url is _UNSEEN:
                    url = _link_target(
                        raw, unsubscribe_url=unsubscribe_url, own_prefix=self._own_prefix
                    )
                    if len(self._link_targets) < _MAX_REMEMBERED_LINKS:
                        self._link_targets[raw] = url
                if url is None or url == unsubscribe_url:
                    continue
                token = self._tokens.click(m_part, index, url)
                pieces += (html[cursor:start], self._own_prefix, "c/", token)
                cursor = end
                index += 1
        if self._track_opens:
            position = _pixel_position(html)
            if position < cursor:  # a link after </body>: put the pixel at the very end
                position = len(html)
            pieces += (
                html[cursor:position],
                f'<img src="{self._own_prefix}o/{self._tokens.open(m_part)}"'
                ' width="1" height="1" alt="">',
            )
            cursor = position
        pieces.append(html[cursor:])
        return "".join(pieces)

    def _list_unsubscribe(self, unsubscribe_url: str) -> bytes:
        value = f"<{unsubscribe_url}>"
        if self._unsubscribe_mailbox:
            token = unsubscribe_url.rsplit("/", 1)[1]
            value += f",\r\n <mailto:{self._unsubscribe_mailbox}?subject=unsubscribe:{token}>"
        return (
            f"List-Unsubscribe: {value}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode()
