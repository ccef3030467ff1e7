"""Settings of the campaign service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "campaign"
    port: int = Field(SERVICE_PORTS["campaign"], validation_alias="CAMPAIGN_PORT")
    contacts_url: str = Field("http://127.0.0.1:8002", validation_alias="CONTACTS_URL")
    # Whether `from_email` must be the account's verified address (or at an allowed domain).
    require_verified_sender: bool = Field(True, validation_alias="CAMPAIGN_REQUIRE_VERIFIED_SENDER")
    # Domains any account may send from, comma-separated (e.g. the platform's own domain).
    allowed_sender_domains: str = Field("", validation_alias="CAMPAIGN_ALLOWED_SENDER_DOMAINS")
    # The From of system mails (sign-up confirmation, password reset) that name none.
    system_from_email: str = Field("no-reply@herald.example", validation_alias="SYSTEM_FROM_EMAIL")
    # How long a verified API key is trusted before auth is asked again (revocation delay).
    api_key_cache_seconds: float = Field(5.0, ge=0, validation_alias="CAMPAIGN_API_KEY_CACHE")
    # How often the emails-per-status gauge is counted again (one GROUP BY over emails).
    status_gauge_seconds: float = Field(
        15.0, gt=0, validation_alias="CAMPAIGN_STATUS_GAUGE_SECONDS"
    )
    http_timeout_seconds: float = Field(10.0, gt=0, validation_alias="CAMPAIGN_HTTP_TIMEOUT")

    @property
    def sender_domains(self) -> frozenset[str]:
        """`allowed_sender_domains` as a set of lower-case domains."""
        return frozenset(
            d.strip().lower() for d in self.allowed_sender_domains.split(",") if d.strip()
        )
