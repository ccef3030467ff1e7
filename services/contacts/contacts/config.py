"""Settings of the contacts service."""

from pydantic import Field

from herald.settings import SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "contacts"
    port: int = Field(SERVICE_PORTS["contacts"], validation_alias="CONTACTS_PORT")
