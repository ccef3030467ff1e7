"""Settings of the auth service."""

from pydantic import Field, SecretStr

from herald.settings import DEVELOPMENT_SECRET_PREFIX, SERVICE_PORTS, BaseServiceSettings


class Settings(BaseServiceSettings):
    service_name: str = "auth"
    port: int = Field(SERVICE_PORTS["auth"], validation_alias="AUTH_PORT")
    # Ed25519 private key (PEM) that signs access tokens; `make run` generates one.
    jwt_private_key: SecretStr = Field(
        SecretStr(DEVELOPMENT_SECRET_PREFIX + "jwt-key"), validation_alias="JWT_PRIVATE_KEY"
    )
    access_token_ttl_seconds: int = Field(600, ge=60, le=3600, validation_alias="JWT_ACCESS_TTL")
    # What API keys are exchanged for at the gateway: short, so a revoked key dies quickly.
    api_key_token_ttl_seconds: int = Field(120, ge=30, le=900, validation_alias="API_KEY_TOKEN_TTL")
    session_lifetime_days: int = Field(30, ge=1, le=365, validation_alias="SESSION_LIFETIME_DAYS")
    system_from_email: str = Field("no-reply@herald.example", validation_alias="SYSTEM_FROM_EMAIL")
    admin_email: str | None = Field(None, validation_alias="ADMIN_EMAIL")
    admin_password: SecretStr | None = Field(None, validation_alias="ADMIN_PASSWORD")

    def secret_fields(self) -> dict[str, SecretStr | None]:
        return {**super().secret_fields(), "JWT_PRIVATE_KEY": self.jwt_private_key}
