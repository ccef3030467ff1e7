"""Settings of the tracking service."""

import ipaddress
import re

from pydantic import Field, SecretStr, field_validator

from herald.settings import SERVICE_PORTS, BaseServiceSettings

# SNS signs with certificates served from its regional endpoints, and only those.
SNS_HOSTS = r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?"


class Settings(BaseServiceSettings):
    service_name: str = "tracking"
    port: int = Field(SERVICE_PORTS["tracking"], validation_alias="TRACKING_PORT")
    # False serves only HTTP (pixel, clicks, webhooks, reports): replicas scaled for the hot
    # path without joining the consumer group.
    run_consumers: bool = Field(True, validation_alias="TRACKING_RUN_CONSUMERS")

    # The hot path's buffer: opens and clicks answered but not yet written.
    flush_interval_seconds: float = Field(
        0.5, gt=0, le=10, validation_alias="TRACKING_FLUSH_INTERVAL"
    )
    flush_batch: int = Field(2000, ge=1, le=50000, validation_alias="TRACKING_FLUSH_BATCH")
    buffer_max: int = Field(100_000, ge=1, validation_alias="TRACKING_BUFFER_MAX")
    # How long a request waits for room in a full buffer before its event is dropped (counted).
    buffer_full_wait_seconds: float = Field(
        1.0, ge=0, le=30, validation_alias="TRACKING_BUFFER_FULL_WAIT"
    )

    # Machine activity.
    # Clicks this soon after the relay accepted the message are a scanner's.
    scanner_click_seconds: float = Field(
        5.0, ge=0, le=3600, validation_alias="TRACKING_SCANNER_CLICK_SECONDS"
    )
    # This many different links of one message clicked within this many seconds: a scanner.
    burst_links: int = Field(2, ge=2, le=100, validation_alias="TRACKING_BURST_LINKS")
    burst_seconds: float = Field(2.0, ge=0, le=60, validation_alias="TRACKING_BURST_SECONDS")
    # Opens from these networks are Apple Mail Privacy Protection's prefetching proxies.
    mpp_networks: str = Field("17.0.0.0/8", validation_alias="TRACKING_MPP_NETWORKS")
    # How many trusted proxies append to X-Forwarded-For in front of us (the gateway: 1).
    forwarded_hops: int = Field(1, ge=0, le=10, validation_alias="TRACKING_FORWARDED_HOPS")

    # Amazon SES through SNS.
    sns_cert_hosts: str = Field(SNS_HOSTS, validation_alias="SNS_CERT_HOSTS")
    # A CA bundle to trust for fetching signing certificates (tests); unset: the system's.
    sns_ca_file: str | None = Field(None, validation_alias="SNS_CA_FILE")
    # Comma-separated topic ARNs whose notifications are accepted; empty: any topic.
    ses_topic_arns: str = Field("", validation_alias="SES_TOPIC_ARNS")
    # SendGrid's signed Event Webhook: the verification key (base64 DER or PEM); unset: unsigned.
    sendgrid_public_key: SecretStr | None = Field(None, validation_alias="SENDGRID_PUBLIC_KEY")
    webhook_max_bytes: int = Field(
        5_000_000, ge=1000, validation_alias="TRACKING_WEBHOOK_MAX_BYTES"
    )

    @field_validator("mpp_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip())
        return value

    @field_validator("sns_cert_hosts")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value
