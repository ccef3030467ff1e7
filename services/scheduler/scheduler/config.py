"""Settings of the scheduler service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "scheduler"
    port: int = Field(SERVICE_PORTS["scheduler"], validation_alias="SCHEDULER_PORT")
