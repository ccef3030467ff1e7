"""Settings of the campaign service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "campaign"
    port: int = Field(SERVICE_PORTS["campaign"], validation_alias="CAMPAIGN_PORT")
