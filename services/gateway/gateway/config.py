"""Settings of the gateway: where each upstream service answers, and the edge's policies."""

from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator

from gateway.domain import Network, trusted_networks
from herald.settings import SERVICE_PORTS, BaseServiceSettings


def _local(service: str) -> str:
    return f"http://127.0.0.1:{SERVICE_PORTS[service]}"


class Settings(BaseServiceSettings):
    service_name: str = "gateway"
    port: int = Field(SERVICE_PORTS["gateway"], validation_alias="GATEWAY_PORT")
    auth_url: str = Field(_local("auth"), validation_alias="AUTH_URL")
    contacts_url: str = Field(_local("contacts"), validation_alias="CONTACTS_URL")
    campaign_url: str = Field(_local("campaign"), validation_alias="CAMPAIGN_URL")
    scheduler_url: str = Field(_local("scheduler"), validation_alias="SCHEDULER_URL")
    dispatcher_url: str = Field(_local("dispatcher"), validation_alias="DISPATCHER_URL")
    tracking_url: str = Field(_local("tracking"), validation_alias="TRACKING_URL")
    upstream_timeout: float = Field(10.0, gt=0, validation_alias="UPSTREAM_TIMEOUT")
    api_key_cache_seconds: float = Field(5.0, ge=0, le=60, validation_alias="API_KEY_CACHE_SECONDS")

    # HTTPS beside plain HTTP: both files set, or neither.
    tls_cert_file: Path | None = Field(None, validation_alias="TLS_CERT_FILE")
    tls_key_file: Path | None = Field(None, validation_alias="TLS_KEY_FILE")
    tls_port: int = Field(8443, ge=1, le=65535, validation_alias="GATEWAY_TLS_PORT")
    hsts_max_age: int = Field(31_536_000, ge=0, validation_alias="HSTS_MAX_AGE")

    # Token buckets; a rate of 0 turns that limit off.
    rate_limit_ip_per_second: float = Field(50.0, ge=0, validation_alias="RATE_LIMIT_IP_PER_SECOND")
    rate_limit_ip_burst: int = Field(1000, ge=1, validation_alias="RATE_LIMIT_IP_BURST")
    rate_limit_account_per_second: float = Field(
        50.0, ge=0, validation_alias="RATE_LIMIT_ACCOUNT_PER_SECOND"
    )
    rate_limit_account_burst: int = Field(500, ge=1, validation_alias="RATE_LIMIT_ACCOUNT_BURST")

    max_body_bytes: int = Field(5 * 1024 * 1024, ge=1024, validation_alias="MAX_BODY_BYTES")
    # A little above the contacts service's own import limit (1 GiB), for the multipart framing.
    max_upload_bytes: int = Field(
        (1 << 30) + (1 << 20), ge=1024, validation_alias="MAX_UPLOAD_BYTES"
    )

    # Peers whose `X-Forwarded-For` is believed (load balancers, TLS terminators in front):
    # comma-separated addresses or CIDR networks; empty: the peer is always the client.
    trusted_proxies: str = Field("127.0.0.1,::1", validation_alias="GATEWAY_TRUSTED_PROXIES")

    # Comma-separated origins allowed to call the API from a browser; empty: no CORS at all.
    cors_origins: str = Field("", validation_alias="CORS_ORIGINS")

    reports_cache_seconds: float = Field(
        5.0, ge=0, le=300, validation_alias="REPORTS_CACHE_SECONDS"
    )
    jwks_cache_seconds: float = Field(30.0, ge=0, le=3600, validation_alias="JWKS_CACHE_SECONDS")
    openapi_refresh_seconds: float = Field(
        60.0, ge=1, le=3600, validation_alias="OPENAPI_REFRESH_SECONDS"
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_parse(cls, value: str) -> str:
        trusted_networks(value)  # a ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _tls_files_together(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    def trusted_proxy_networks(self) -> list[Network]:
        """The networks of `GATEWAY_TRUSTED_PROXIES`."""
        return trusted_networks(self.trusted_proxies)

    def cors_origin_list(self) -> list[str]:
        """The configured CORS origins, without blanks."""
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    def upstreams(self) -> dict[str, str]:
        """Each service behind the gateway and its base URL."""
        return {
            "auth": self.auth_url,
            "contacts": self.contacts_url,
            "campaign": self.campaign_url,
            "scheduler": self.scheduler_url,
            "dispatcher": self.dispatcher_url,
            "tracking": self.tracking_url,
        }
