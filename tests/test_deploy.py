"""The deployment files agree with the code, so that the stack cannot drift from the services.

docker-compose.yml, the Dockerfile, Prometheus' scrape and alert rules and the Grafana dashboard
are parsed and compared with the services' Settings, ports, topics and metrics. Nothing is run:
no Docker engine is needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from herald import events
from herald.settings import SERVICE_PORTS, BaseServiceSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
# Each dashboard the issue asks for, and series it must show (beyond using only real metrics).
DASHBOARD_SHOWS: dict[str, set[str]] = {
    "overview": {
        "herald_http_requests_total",
        "herald_http_request_duration_seconds_bucket",
        "herald_events_published_total",
        "herald_events_consumed_total",
        "herald_consumer_lag",
        "herald_outbox_backlog",
    },
    "delivery": {
        "herald_campaign_emails",
        "herald_campaign_emails_queued_total",
        "herald_scheduler_recipients_total",
        "herald_dispatcher_messages_total",
        "herald_dispatcher_smtp_seconds_bucket",
        "herald_dispatcher_backlog",
        "herald_consumer_lag",
    },
    "tracking": {
        "herald_tracking_activity_total",
        "herald_tracking_buffer_events",
        "herald_tracking_flush_seconds_bucket",
        "herald_tracking_webhook_events_total",
        "herald_consumer_lag",
    },
    "api": {
        "herald_http_requests_total",
        "herald_http_request_duration_seconds_bucket",
        "herald_gateway_upstream_requests_total",
        "herald_gateway_upstream_seconds_bucket",
        "herald_gateway_rejected_total",
        "herald_gateway_cache_total",
    },
}

SERVICES = list(SERVICE_PORTS)
BACKEND = [s for s in SERVICES if s != "gateway"]
INFRASTRUCTURE = {"postgres", "kafka", "kafka-init", "migrate", "prometheus", "grafana", "mailpit"}
# What may be reached from outside the compose network, as container ports.
PUBLISHED = {"gateway": {8000}, "grafana": {3000}, "prometheus": {9090}, "mailpit": {8025}}
IMAGE = "herald:latest"

# Variables the design gives a service whose Settings do not read them yet, so compose may carry
# them ahead of the code. test_awaited_settings_are_still_unread fails once the code reads one:
# then its entry goes, and the variable is checked like every other.
AWAITING_CODE: dict[str, frozenset[str]] = {}
# Metrics the alert rules use before the code declares them (same life cycle as above).
AWAITING_METRICS: frozenset[str] = frozenset()

# The gateway keeps nothing durable: it opens neither a database pool nor a Kafka producer, so it
# is not given the addresses (or the credentials) the base Settings class would read.
UNUSED_BY: dict[str, frozenset[str]] = {
    "gateway": frozenset({"DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_IDEMPOTENT_PRODUCER"})
}

# A loopback address in a default is an embedded/`make run` value: wrong inside a container.
_LOOPBACK = re.compile(r"(^|//|@)(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:|/|$)")


# --- reading the files -------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _services() -> dict[str, Any]:
    services = _yaml(COMPOSE)["services"]
    assert isinstance(services, dict)
    return services


def _service(name: str) -> dict[str, Any]:
    service = _services()[name]
    assert isinstance(service, dict)
    return service


def _environment(name: str) -> dict[str, str]:
    env = _service(name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write `environment:` as a mapping"
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _port(service: str) -> int:
    """The port compose gives a Herald service through its `<SVC>_PORT`."""
    return int(_environment(service)[f"{service.upper()}_PORT"])


def _settings_class(service: str) -> type[BaseServiceSettings]:
    settings: type[BaseServiceSettings] = importlib.import_module(f"{service}.config").Settings
    assert issubclass(settings, BaseServiceSettings)
    return settings


def _variable(name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    if alias is None:
        return name.upper()
    if not isinstance(alias, str):
        raise TypeError(f"{name}: teach tests/test_deploy.py to read {type(alias).__name__}")
    return alias


def _reads(service: str) -> dict[str, FieldInfo]:
    """Every environment variable the service's Settings read, with its field."""
    fields = _settings_class(service).model_fields
    return {_variable(name, field): field for name, field in fields.items()}


def _is_secret(field: FieldInfo) -> bool:
    return SecretStr in (field.annotation, *typing.get_args(field.annotation))


def _metric_names() -> set[str]:
    """Every series name the code can expose: shared metrics and each service's own."""
    importlib.import_module("herald.metrics")
    for service in SERVICES:
        if importlib.util.find_spec(f"{service}.metrics") is not None:
            importlib.import_module(f"{service}.metrics")
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    names = set()
    for family in REGISTRY.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def _used_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bherald_[a-z0-9_]+", expr))


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_has_the_whole_stack() -> None:
    missing = (set(SERVICES) | INFRASTRUCTURE) - set(_services())
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"


def test_each_herald_service_runs_its_module_from_the_one_image() -> None:
    for service in SERVICES:
        spec = _service(service)
        assert spec["command"] == [service], f"{service}: command must name its module"
        assert importlib.util.find_spec(f"{service}.__main__") is not None
        assert spec["image"] == IMAGE, f"{service} must run {IMAGE}"
        assert spec["build"]["context"] == "."
    migrate = _service("migrate")
    assert migrate["command"] == ["herald.migrations"]
    assert migrate["image"] == IMAGE
    assert importlib.util.find_spec("herald.migrations") is not None


def test_migrations_run_against_the_services_database() -> None:
    # `python -m herald.migrations` reads DATABASE_URL and nothing else from its environment.
    assert set(_environment("migrate")) == {"DATABASE_URL"}
    for service in BACKEND:
        assert _environment(service)["DATABASE_URL"] == _environment("migrate")["DATABASE_URL"]


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_only_variables_the_service_reads(service: str) -> None:
    unread = set(_environment(service)) - set(_reads(service)) - AWAITING_CODE.get(service, set())
    assert not unread, f"{service}'s Settings read none of {sorted(unread)}: a typo or stale?"


def test_awaited_settings_are_still_unread() -> None:
    for service, variables in AWAITING_CODE.items():
        now_read = variables & set(_reads(service))
        assert not now_read, f"{service} reads {sorted(now_read)} now: drop it from AWAITING_CODE"
        assert variables <= set(_environment(service)), f"compose no longer sets {variables}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_setting_is_set_or_has_a_working_default(service: str) -> None:
    env = _environment(service)
    unused = UNUSED_BY.get(service, frozenset())
    for variable, field in _reads(service).items():
        if field.is_required():
            assert variable in env, f"{service} requires {variable}; compose does not set it"
        default = field.get_default()
        if isinstance(default, str) and _LOOPBACK.search(default) and variable not in unused:
            assert variable in env, (
                f"{service}'s {variable} defaults to {default!r}, the container itself"
            )
    assert env["HERALD_ENV"] == "production"
    assert env["HTTP_HOST"] == "0.0.0.0"
    if service in BACKEND:
        assert env["KAFKA_IDEMPOTENT_PRODUCER"] == "true"


def test_the_gateway_really_uses_neither_database_nor_kafka() -> None:
    gateway_app = importlib.import_module("gateway.app")
    assert "uses_database=False" in inspect.getsource(gateway_app), "revisit UNUSED_BY"
    assert not UNUSED_BY["gateway"] & set(_environment("gateway"))


@pytest.mark.parametrize("service", SERVICES)
def test_secrets_come_from_the_environment_with_no_default(service: str) -> None:
    env = _environment(service)
    required = _settings_class(service).model_construct().secret_fields()
    for variable in required:
        assert re.fullmatch(rf"\$\{{{variable}:\?[^}}]+\}}", env.get(variable, "")), (
            f"{service}: {variable} must be `${{{variable}:?message}}`"
        )
    for variable, field in _reads(service).items():
        if _is_secret(field) and variable in env:
            assert re.fullmatch(rf"\$\{{{variable}(:\?[^}}]+|:-)\}}", env[variable]), (
                f"{service}: {variable} is a secret; never write its value into compose"
            )


def test_infrastructure_secrets_have_no_default() -> None:
    password = r"\$\{POSTGRES_PASSWORD:\?[^}]+\}"
    assert re.fullmatch(password, _environment("postgres")["POSTGRES_PASSWORD"])
    assert re.search(f":{password}@postgres:5432/", _environment("migrate")["DATABASE_URL"])
    grafana = _environment("grafana")["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", grafana)


def test_service_urls_point_at_the_compose_services() -> None:
    for service in SERVICES:
        for variable, value in _environment(service).items():
            target = variable.removesuffix("_URL").lower()
            if variable.endswith("_URL") and target in SERVICES:
                assert value == f"http://{target}:{_port(target)}", f"{service}: {variable}"
    gateway = importlib.import_module("gateway.config").Settings.model_construct()
    env = _environment("gateway")
    for upstream in gateway.upstreams():
        assert f"{upstream.upper()}_URL" in env, f"the gateway cannot find {upstream}"


def test_ports_healthchecks_and_what_is_published() -> None:
    for service in SERVICES:
        port = _port(service)
        assert port == SERVICE_PORTS[service], f"{service} moved from its port in herald.settings"
        probe = " ".join(_service(service)["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in probe, f"{service}'s healthcheck port"
    published = {
        name: {int(str(port).rsplit(":", 1)[-1]) for port in spec["ports"]}
        for name, spec in _services().items()
        if spec.get("ports")
    }
    assert published == PUBLISHED
    assert _service("gateway")["ports"] == [f"{_port('gateway')}:{_port('gateway')}"]


def test_services_start_after_their_dependencies() -> None:
    for service in BACKEND:
        depends = _service(service)["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["kafka-init"]["condition"] == "service_completed_successfully"
    gateway = _service("gateway")["depends_on"]
    assert {s: gateway[s]["condition"] for s in BACKEND} == dict.fromkeys(
        BACKEND, "service_healthy"
    )


def test_kafka_init_creates_every_topic() -> None:
    env = _environment("kafka-init")
    topics, dead_letters = env["TOPICS"].split(), env["DLQ_TOPICS"].split()
    expected = {t for t in events.topics() if not t.startswith("test.")}
    assert len(topics + dead_letters) == len(set(topics + dead_letters)), "a topic is listed twice"
    assert set(topics + dead_letters) == expected, "kafka-init's topics != herald.events.topics()"
    assert all(t.endswith(".dlq") for t in dead_letters)
    assert not any(t.endswith(".dlq") for t in topics)
    script = "\n".join(_service("kafka-init")["command"])
    assert "$$TOPICS" in script
    assert "$$DLQ_TOPICS" in script


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_builds_one_image_for_every_service() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line.split(maxsplit=1) for line in text.splitlines() if line[:1].isupper()]
    entrypoints = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints == [["python", "-m"]]
    assert [args for op, args in instructions if op == "FROM"] == ["python:3.12-slim"]
    users = [args for op, args in instructions if op == "USER"]
    assert users, "the services must not run as root"
    assert users[-1] not in ("root", "0"), "the services must not run as root"
    assert "pip install -r requirements.lock" in text
    copied = {args.split()[0] for op, args in instructions if op == "COPY"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for where in pyproject["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert where.split("/")[0] in copied, f"the image lacks {where}"
    assert {"pyproject.toml", "requirements.lock"} <= copied


# --- Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_exactly_the_seven_services() -> None:
    config = _yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    for service, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        assert targets == [f"{service}:{_port(service)}"], f"{service} is scraped elsewhere"
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS.parent / config["rule_files"][0]).is_file()
    prometheus = _service("prometheus")
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_alert_rules_are_complete_and_use_real_metrics() -> None:
    known = _metric_names() | AWAITING_METRICS
    rules = [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "two alerts share a name"
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        unknown = _used_metrics(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} uses metrics no code exposes: {sorted(unknown)}"
    used = set().union(*(_used_metrics(rule["expr"]) for rule in rules))
    assert used >= AWAITING_METRICS, "an awaited metric is no longer used: drop it"


def test_awaited_metrics_are_still_missing() -> None:
    declared = AWAITING_METRICS & _metric_names()
    assert not declared, f"{sorted(declared)} exist now: drop them from AWAITING_METRICS"


# --- Grafana -----------------------------------------------------------------------------------


def test_grafana_provisions_prometheus_and_the_dashboards() -> None:
    (source,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = _yaml(GRAFANA / "provisioning" / "dashboards" / "herald.yml")["providers"]
    path = provider["options"]["path"]
    volumes = _service("grafana")["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in volumes
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes


def test_the_dashboards_are_the_ones_asked_for() -> None:
    files = {path.stem: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")}
    assert set(files) == set(DASHBOARD_SHOWS)
    uids = [dashboard["uid"] for dashboard in files.values()]
    assert len(set(uids)) == len(uids), "two dashboards share a uid"


@pytest.mark.parametrize("name", sorted(DASHBOARD_SHOWS))
def test_dashboard_panels_query_real_metrics(name: str) -> None:
    dashboard = json.loads((DASHBOARDS / f"{name}.json").read_text())
    assert dashboard["schemaVersion"] == 39
    (source,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    panels = dashboard["panels"]
    assert panels
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    known = _metric_names()
    used: set[str] = set()
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        assert all(e.strip() for e in exprs), f"panel {panel['title']!r} has an empty query"
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
        for expr in exprs:
            unknown = _used_metrics(expr) - known
            assert not unknown, f"{panel['title']!r} queries unknown metrics: {sorted(unknown)}"
            used |= _used_metrics(expr)
    missing = DASHBOARD_SHOWS[name] - used
    assert not missing, f"the {name} dashboard lacks {sorted(missing)}"
