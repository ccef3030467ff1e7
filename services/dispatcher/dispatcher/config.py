"""Settings of the dispatcher service."""

from pydantic import Field, SecretStr

from herald.settings import EMBEDDED_SMTP_URL, SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "dispatcher"
    port: int = Field(SERVICE_PORTS["dispatcher"], validation_alias="DISPATCHER_PORT")

    # The relay: smtp://, smtp+starttls:// or smtps://, with user:password@ when it wants AUTH.
    # A plain string like DATABASE_URL (which carries a password too); never logged.
    smtp_url: str = Field(EMBEDDED_SMTP_URL, validation_alias="SMTP_URL")
    # Whether the relay's TLS certificate must be valid for its name (off only for test relays).
    smtp_tls_verify: bool = Field(True, validation_alias="SMTP_TLS_VERIFY")
    # The name we greet the relay with (EHLO); unset: this host's name.
    smtp_helo_name: str | None = Field(None, validation_alias="SMTP_HELO_NAME")
    # Seconds to wait for any one reply of the relay (RFC 5321 allows minutes for the last).
    smtp_timeout_seconds: float = Field(60.0, gt=0, le=600, validation_alias="SMTP_TIMEOUT")
    # Pipeline MAIL, RCPT and DATA (RFC 2920) when the relay offers it; off for a relay that
    # offers it and gets it wrong.
    smtp_pipelining: bool = Field(True, validation_alias="SMTP_PIPELINING")
    # Persistent connections to the relay, each carrying one transaction at a time.
    smtp_concurrency: int = Field(32, ge=1, le=256, validation_alias="DISPATCHER_CONCURRENCY")

    # Messages per second, for this process (0: no limit) and per account in this process.
    send_rate: float = Field(0.0, ge=0, validation_alias="DISPATCHER_SEND_RATE")
    account_send_rate: float = Field(0.0, ge=0, validation_alias="DISPATCHER_ACCOUNT_SEND_RATE")

    # Retries of deferred mail: exponential back-off from `base` up to `max` between attempts
    # (with jitter), giving up once the next attempt would fall after `horizon` since queueing.
    retry_base_seconds: float = Field(60.0, gt=0, validation_alias="DISPATCHER_RETRY_BASE")
    retry_max_seconds: float = Field(3600.0, gt=0, validation_alias="DISPATCHER_RETRY_MAX")
    retry_horizon_seconds: float = Field(
        172800.0, gt=0, validation_alias="DISPATCHER_RETRY_HORIZON"
    )

    # Messages claimed from the queue table at a time, and held in memory at most.
    claim_batch: int = Field(200, ge=1, le=5000, validation_alias="DISPATCHER_CLAIM_BATCH")
    # How often due retries and orphaned messages are looked for when nothing wakes us.
    poll_interval_seconds: float = Field(1.0, gt=0, le=60, validation_alias="DISPATCHER_POLL")
    # How long a stopping dispatcher lets transactions under way finish.
    shutdown_grace_seconds: float = Field(10.0, ge=0, validation_alias="DISPATCHER_SHUTDOWN_GRACE")
    # Finished message records (and the inbox) older than this are deleted.
    retention_days: int = Field(30, ge=8, validation_alias="DISPATCHER_RETENTION_DAYS")

    # The domain after the @ of Message-ID; unset: the domain of the email's From address.
    message_id_domain: str | None = Field(None, validation_alias="MESSAGE_ID_DOMAIN")
    # The envelope sender (MAIL FROM, where bounces go); unset: the email's From address.
    return_path: str | None = Field(None, validation_alias="RETURN_PATH")
    # A mailbox that unsubscribes whoever writes to it; when set, List-Unsubscribe offers it too.
    unsubscribe_mailbox: str | None = Field(None, validation_alias="UNSUBSCRIBE_MAILBOX")

    # DKIM: messages whose From domain is `dkim_domain` (or below it) are signed with this key.
    dkim_domain: str | None = Field(None, validation_alias="DKIM_DOMAIN")
    dkim_selector: str | None = Field(None, validation_alias="DKIM_SELECTOR")
    dkim_private_key: SecretStr | None = Field(None, validation_alias="DKIM_PRIVATE_KEY")

    @property
    def dkim_configured(self) -> bool:
        return bool(self.dkim_domain and self.dkim_selector and self.dkim_private_key)
