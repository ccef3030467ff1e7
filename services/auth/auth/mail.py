"""The mails auth sends (confirmation, reset): send requests on `email.requests`.

They travel the platform's own pipeline like any other mail, marked `system` so that the
recipient's suppression state and the account's quota do not hold them back.
"""

from __future__ import annotations

import hashlib
import html
import uuid

from auth.config import Settings
from herald import outbox
from herald.db import Conn
from herald.events import Envelope
from herald.events.requests import SendRequested


def _idempotency_key(kind: str, token: str) -> str:
    # Derived one way from the link's token: the key is stored and shown outside auth, and a
    # slice of the token itself would hand part of the secret to whoever reads it.
    return f"auth:{kind}:{hashlib.sha256(b'idempotency:' + token.encode()).hexdigest()[:32]}"


async def _send(
    conn: Conn,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    to: str,
    subject: str,
    text: str,
    link: str,
    key: str,
) -> None:
    body_html = (
        f"<p>{html.escape(text)}</p>"
        f'<p><a href="{html.escape(link)}">{html.escape(link)}</a></p>'
        "<p>If you did not ask for this, ignore this message.</p>"
    )
    request = SendRequested(
        idempotency_key=key,
        to=[to],
        subject=subject,
        text=f"{text}\n\n{link}\n\nIf you did not ask for this, ignore this message.\n",
        html=body_html,
        from_name="Herald",
        from_email=settings.system_from_email,
        system=True,
    )
    await outbox.write(conn, Envelope.wrap(request, account_id=user_id))


async def send_confirmation(
    conn: Conn, settings: Settings, *, user_id: uuid.UUID, to: str, token: str
) -> None:
    """Ask `to` to confirm their address by opening a link."""
    link = f"{settings.public_base_url}/signup/confirm?token={token}"
    await _send(
        conn,
        settings,
        user_id=user_id,
        to=to,
        subject="Confirm your email address",
        text="Open this link to confirm your email address for Herald:",
        link=link,
        key=_idempotency_key("confirm", token),
    )


async def send_password_reset(
    conn: Conn, settings: Settings, *, user_id: uuid.UUID, to: str, token: str
) -> None:
    """Send a link that lets the owner of `to` choose a new password."""
    link = f"{settings.public_base_url}/password/reset?token={token}"
    await _send(
        conn,
        settings,
        user_id=user_id,
        to=to,
        subject="Reset your Herald password",
        text="Open this link to choose a new password (it works once, for 30 minutes):",
        link=link,
        key=_idempotency_key("reset", token),
    )
