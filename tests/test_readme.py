"""The README says what the code does: generated sections current, every setting documented."""

from pathlib import Path

from pydantic_settings import BaseSettings

from herald import catalogue
from herald.settings import SERVICE_PORTS

README = Path(__file__).resolve().parents[1] / "README.md"


def _settings_classes() -> list[type[BaseSettings]]:
    import importlib

    return [importlib.import_module(f"{s}.config").Settings for s in SERVICE_PORTS]


def test_service_map_and_event_catalogue_match_the_code():
    text = README.read_text()
    assert catalogue.render(text) == text, "run `python -m herald.catalogue` and commit README.md"


def test_every_environment_variable_the_services_read_is_documented():
    text = README.read_text()
    missing = set()
    for settings in _settings_classes():
        for name, field in settings.model_fields.items():
            alias = field.validation_alias
            variable = alias if isinstance(alias, str) else name.upper()
            if name != "service_name" and variable not in text:
                missing.add(variable)
    assert not missing, f"document these in README.md's configuration table: {sorted(missing)}"


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make run" in text
    assert "make test" in text
