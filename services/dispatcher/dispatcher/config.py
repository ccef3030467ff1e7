"""Settings of the dispatcher service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "dispatcher"
    port: int = Field(SERVICE_PORTS["dispatcher"], validation_alias="DISPATCHER_PORT")
