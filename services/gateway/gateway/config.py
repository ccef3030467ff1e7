"""Settings of the gateway: where each upstream service answers."""

from pydantic import Field

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
