"""The whole platform as processes: every service up, observable, and recovering from a crash."""

import signal

import httpx
import orjson

from herald.devinfra.stack import BACKEND_SERVICES, SERVICES, Stack


async def test_gateway_reports_every_service_ready(gateway: httpx.AsyncClient):
    response = await gateway.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == set(BACKEND_SERVICES)
    assert set(body["checks"].values()) == {"ok"}


async def test_each_service_serves_health_readiness_and_metrics(platform: Stack):
    async with httpx.AsyncClient(timeout=10) as client:
        for name in SERVICES:
            base = platform.url(name)
            health = (await client.get(f"{base}/healthz")).json()
            assert health == {"status": "ok", "service": name, "version": "0.1.0"}
            ready = (await client.get(f"{base}/readyz")).json()
            assert ready["status"] == "ready", (name, ready)
            if name != "gateway":
                assert {"database", "migrations", "broker", "outbox_relay"} <= set(ready["checks"])
            metrics = (await client.get(f"{base}/metrics")).text
            assert (
                'herald_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics
            )
            assert f'herald_service_info{{service="{name}",version="0.1.0"}} 1.0' in metrics


async def test_errors_are_json_and_requests_carry_an_id(gateway: httpx.AsyncClient):
    response = await gateway.get("/no/such/path", headers={"X-Request-ID": "trace-me-1"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert response.headers["x-request-id"] == "trace-me-1"
    assert (await gateway.get("/healthz")).headers["x-request-id"]


async def test_service_logs_are_json_lines(platform: Stack):
    lines = (platform.logs_dir / "auth.log").read_bytes().splitlines()
    entries = [orjson.loads(line) for line in lines if line.startswith(b"{")]
    assert entries, "auth wrote no JSON log lines"
    assert all({"ts", "level", "service", "msg"} <= set(e) for e in entries)
    assert any(e["msg"] == "service started" for e in entries)


async def test_a_crashed_service_is_reported_and_recovers(
    platform: Stack, gateway: httpx.AsyncClient
):
    await platform.stop_service("contacts", signal.SIGKILL)
    body = (await gateway.get("/readyz")).json()
    assert body["status"] == "not_ready"
    assert body["checks"]["contacts"] == "failing"
    assert body["checks"]["auth"] == "ok"

    await platform.start_service("contacts")
    await platform.wait_ready(60, ["contacts"])
    assert (await gateway.get("/readyz")).status_code == 200


async def test_gateway_routes_public_paths_and_hides_internal_ones(gateway: httpx.AsyncClient):
    jwks = (await gateway.get("/.well-known/jwks.json")).json()
    assert jwks["keys"][0]["alg"] == "EdDSA"
    assert (await gateway.get("/internal/anything")).status_code == 404
    assert (await gateway.get("/contacts/internal/recipients")).status_code == 404


async def test_every_service_reports_internal_stats_only_to_services(platform: Stack):
    headers = {"X-Internal-Token": platform.secrets["INTERNAL_TOKEN"]}
    async with httpx.AsyncClient(timeout=10) as client:
        for name in BACKEND_SERVICES:
            assert (await client.get(f"{platform.url(name)}/internal/stats")).status_code == 403
            stats = (
                await client.get(f"{platform.url(name)}/internal/stats", headers=headers)
            ).json()
            assert stats["service"] == name
            assert stats["outbox_backlog"] >= 0
            assert stats["schema_bytes"] > 0
            assert isinstance(stats["consumer_lag"], dict)
