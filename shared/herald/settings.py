"""The settings every service shares, read from environment variables.

Defaults serve `make run` on one machine. Secrets have development defaults that are refused
when `HERALD_ENV=production`, so a production deployment cannot start on a known secret.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_SECRET_PREFIX = "dev-insecure-"  # noqa: S105 - a marker, not a secret

EMBEDDED_DATABASE_URL = "postgresql://herald@127.0.0.1:55432/herald"
EMBEDDED_KAFKA = "127.0.0.1:9092"
EMBEDDED_SMTP_URL = "smtp://127.0.0.1:1025"

SERVICE_PORTS: dict[str, int] = {
    "gateway": 8000,
    "auth": 8001,
    "contacts": 8002,
    "campaign": 8003,
    "scheduler": 8004,
    "dispatcher": 8005,
    "tracking": 8006,
}


class BaseServiceSettings(BaseSettings):
    """Configuration common to every Herald service; each service extends it."""

    model_config = SettingsConfigDict(
        env_file=None,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        # Only the documented names (the aliases) are read from the environment; field names
        # (`port`, `service_name`) would collide with variables platforms set (PORT, ...).
        env_prefix="HERALD_UNUSED_",
    )

    service_name: str = "herald"
    environment: Literal["development", "test", "production"] = Field(
        "development", validation_alias="HERALD_ENV"
    )
    version: str = Field("0.1.0", validation_alias="HERALD_VERSION")
    http_host: str = Field("127.0.0.1", validation_alias="HTTP_HOST")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    log_format: Literal["json", "text"] = Field("json", validation_alias="LOG_FORMAT")

    database_url: str = Field(EMBEDDED_DATABASE_URL, validation_alias="DATABASE_URL")
    database_pool_min: int = Field(1, ge=0, validation_alias="DATABASE_POOL_MIN")
    database_pool_max: int = Field(10, ge=1, validation_alias="DATABASE_POOL_MAX")

    kafka_bootstrap_servers: str = Field(EMBEDDED_KAFKA, validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: str | None = Field(None, validation_alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD")
    # The embedded broker supports neither idempotent producers nor transactions; real Kafka does.
    kafka_idempotent_producer: bool = Field(False, validation_alias="KAFKA_IDEMPOTENT_PRODUCER")
    # The embedded broker holds a new member's JoinGroup for about half of this, so the
    # development stack and the tests shorten it; production keeps a pause-tolerant default.
    kafka_session_timeout_ms: int = Field(
        10000, ge=1000, validation_alias="KAFKA_SESSION_TIMEOUT_MS"
    )
    kafka_partitions: int = Field(6, ge=1, validation_alias="KAFKA_PARTITIONS")
    kafka_replication_factor: int = Field(1, ge=1, validation_alias="KAFKA_REPLICATION_FACTOR")
    # How long the outbox keeps events after publishing them, so that what a broker lost can be
    # published again (consumers deduplicate by event id). Keep it below the inbox retention.
    outbox_retention_hours: int = Field(72, ge=1, validation_alias="OUTBOX_RETENTION_HOURS")

    public_base_url: str = Field("http://127.0.0.1:8000", validation_alias="PUBLIC_BASE_URL")

    # Tokens: auth signs them; every service verifies them locally against auth's JWKS.
    auth_url: str = Field("http://127.0.0.1:8001", validation_alias="AUTH_URL")
    jwt_issuer: str = Field("herald", validation_alias="JWT_ISSUER")
    jwt_audience: str = Field("herald-api", validation_alias="JWT_AUDIENCE")
    # Shared by the services for calls the gateway never forwards (`/internal/...`).
    internal_token: SecretStr = Field(
        SecretStr(DEVELOPMENT_SECRET_PREFIX + "internal-token"), validation_alias="INTERNAL_TOKEN"
    )
    # HMAC keys for links in mail (tracking, unsubscribe): "kid:secret,kid:secret", newest first.
    link_signing_keys: SecretStr = Field(
        SecretStr("dev:" + DEVELOPMENT_SECRET_PREFIX + "link-signing-key"),
        validation_alias="LINK_SIGNING_KEYS",
    )

    @property
    def db_schema(self) -> str:
        """The Postgres schema this service owns: its name."""
        return self.service_name

    def secret_fields(self) -> dict[str, SecretStr | None]:
        """Secrets to vet in production; services add theirs by extending this."""
        return {"INTERNAL_TOKEN": self.internal_token, "LINK_SIGNING_KEYS": self.link_signing_keys}

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> BaseServiceSettings:
        if self.environment != "production":
            return self
        for name, secret in self.secret_fields().items():
            value = secret.get_secret_value() if secret is not None else ""
            if not value or DEVELOPMENT_SECRET_PREFIX in value or value == "changeme":
                raise ValueError(f"{name} must be set to a real secret when HERALD_ENV=production")
        return self
