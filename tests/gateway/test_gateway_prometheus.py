"""Debian's Prometheus scrapes the running test platform: every target up, the key series there.

The scrape configuration is generated for the test stack's ports (one job per service, named
like the deployed configuration's jobs); the alert rules of `deploy/prometheus/` are loaded too,
so a rule that cannot be evaluated against real series fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack
from tests.conftest import TokenMaker
from tests.gateway.conftest import Account

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"

KEY_SERIES = [
    "herald_service_info",
    "herald_http_requests_total",
    "herald_http_request_duration_seconds_bucket",
    "herald_outbox_backlog",
    "herald_gateway_upstream_requests_total",
    "herald_campaign_emails",
]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    async def query(self, client: httpx.AsyncClient, expression: str) -> list[dict[str, Any]]:
        response = await client.get(f"{self.url}/api/v1/query", params={"query": expression})
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
async def prometheus(
    platform: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is required (make test installs it)"
    directory = tmp_path_factory.mktemp("prometheus")
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": name,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [platform.url(name).removeprefix("http://")]}],
            }
            for name in SERVICES
        ],
    }
    if ALERTS.is_file():
        config["rule_files"] = [str(ALERTS)]
    # JSON is YAML: no YAML library needed to write it.
    (directory / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


async def _until(check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        # ValueError: a Prometheus still starting answers its API with plain text.
        with contextlib.suppress(httpx.HTTPError, AssertionError, ValueError):
            return await check()
        if time.monotonic() > deadline:
            return await check()
        await asyncio.sleep(0.5)


async def test_prometheus_scrapes_every_service_and_finds_the_key_series(
    prometheus: Prometheus, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    # Traffic through the gateway, so that the forwarding series exist.
    caller = {"Authorization": f"Bearer {mint_token()}"}
    for path in ("/.well-known/jwks.json", "/contacts", "/openapi.json"):
        await gateway.get(path, headers=caller)
    async with httpx.AsyncClient(timeout=10) as client:

        async def all_up() -> None:
            targets = (await client.get(f"{prometheus.url}/api/v1/targets")).json()
            active = targets["data"]["activeTargets"]
            assert {t["labels"]["job"] for t in active} == set(SERVICES), active
            assert {t["health"] for t in active} == {"up"}, active

        await _until(all_up)
        up = await prometheus.query(client, "up")
        assert {r["metric"]["job"]: r["value"][1] for r in up} == {s: "1" for s in SERVICES}

        async def series_present() -> None:
            for name in KEY_SERIES:
                assert await prometheus.query(client, name), name

        await _until(series_present, timeout=30)
        info = await prometheus.query(client, "herald_service_info")
        assert {r["metric"]["service"] for r in info} == set(SERVICES)
        forwarded = await prometheus.query(client, "herald_gateway_upstream_requests_total")
        assert {"auth", "contacts"} <= {r["metric"]["service"] for r in forwarded}

        async def gateway_rate() -> None:
            # A rate needs two scrapes of the counter.
            rate = await prometheus.query(
                client, 'sum by (job) (rate(herald_http_requests_total{job="gateway"}[1m]))'
            )
            assert rate, "no request rate for the gateway"

        await _until(gateway_rate, timeout=30)


async def test_alert_rules_load_and_evaluate_against_real_series(prometheus: Prometheus):
    async with httpx.AsyncClient(timeout=10) as client:

        async def evaluated() -> list[dict[str, Any]]:
            groups = (await client.get(f"{prometheus.url}/api/v1/rules")).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert rules, "no rules loaded"
            assert all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
            return rules

        rules = await _until(evaluated)
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not broken, broken


async def test_every_dashboard_query_runs(prometheus: Prometheus):
    """Each panel's PromQL, with Grafana's variables filled in, is accepted by Prometheus."""
    fill = {"$__rate_interval": "1m", "$job": ".*"}
    async with httpx.AsyncClient(timeout=10) as client:
        for path in sorted(DASHBOARDS.glob("*.json")):
            for panel in json.loads(path.read_text())["panels"]:
                for target in panel["targets"]:
                    expr = target["expr"]
                    for variable, value in fill.items():
                        expr = expr.replace(variable, value)
                    response = await client.get(
                        f"{prometheus.url}/api/v1/query", params={"query": expr}
                    )
                    assert response.status_code == 200, (path.name, panel["title"], response.text)


async def test_the_emails_per_status_gauge_follows_the_emails(
    prometheus: Prometheus, gateway: httpx.AsyncClient, account: Account
):
    statuses = {"draft", "scheduled", "queued", "sending", "sent", "cancelled", "failed"}
    async with httpx.AsyncClient(timeout=10) as client:

        async def by_status() -> dict[str, float]:
            found = await prometheus.query(client, "herald_campaign_emails")
            counts = {r["metric"]["status"]: float(r["value"][1]) for r in found}
            assert set(counts) == statuses, counts
            return counts

        before = await _until(by_status, timeout=30)
        for n in range(3):
            composed = await gateway.post(
                "/compose",
                json={"subject": f"Gauge {n}", "text": "t", "to": ["gauge@example.com"]},
                headers=account.headers,
            )
            assert composed.status_code == 201, composed.text

        async def grown() -> None:
            after = await by_status()
            assert after["draft"] >= before["draft"] + 3, (before, after)

        # Counted again every CAMPAIGN_STATUS_GAUGE_SECONDS (15 s), scraped every second.
        await _until(grown, timeout=45)
