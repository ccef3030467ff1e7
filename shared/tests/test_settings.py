import pytest
from pydantic import Field, SecretStr, ValidationError

from herald.settings import BaseServiceSettings


class _WithSecret(BaseServiceSettings):
    signing_key: SecretStr = Field(SecretStr("dev-insecure-signing-key"), validation_alias="KEY")

    def secret_fields(self) -> dict[str, SecretStr | None]:
        return {"KEY": self.signing_key}


def test_development_accepts_the_development_secret(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HERALD_ENV", raising=False)
    assert _WithSecret().signing_key.get_secret_value().startswith("dev-insecure-")


@pytest.mark.parametrize("value", [None, "", "dev-insecure-signing-key", "changeme"])
def test_production_refuses_placeholder_secrets(monkeypatch: pytest.MonkeyPatch, value):
    monkeypatch.setenv("HERALD_ENV", "production")
    if value is None:
        monkeypatch.delenv("KEY", raising=False)
    else:
        monkeypatch.setenv("KEY", value)
    with pytest.raises(ValidationError, match="KEY must be set to a real secret"):
        _WithSecret()


def test_production_accepts_a_real_secret(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HERALD_ENV", "production")
    monkeypatch.setenv("KEY", "k3y-from-the-vault-0f9a8b7c")
    assert _WithSecret().signing_key.get_secret_value() == "k3y-from-the-vault-0f9a8b7c"


def test_environment_variables_configure_the_service(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/herald")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("KAFKA_PARTITIONS", "12")
    settings = BaseServiceSettings()
    assert settings.database_url == "postgresql://u@db:5432/herald"
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.kafka_partitions == 12
    assert settings.kafka_idempotent_producer is False
