"""Settings of the auth service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "auth"
    port: int = Field(SERVICE_PORTS["auth"], validation_alias="AUTH_PORT")
