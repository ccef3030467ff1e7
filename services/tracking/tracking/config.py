"""Settings of the tracking service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "tracking"
    port: int = Field(SERVICE_PORTS["tracking"], validation_alias="TRACKING_PORT")
