"""The quick start in `docs/quickstart.md`, run word for word against the running platform.

Every ```bash block of the page, in order, becomes one script under `set -euo pipefail`; the
page's own variables (`HERALD`, `SINK`, `ME`) are pointed at the test platform and a new
address, which is all the page leaves open. (```sh blocks are alternatives, such as HTTPS,
that the page shows but does not run in sequence.)
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from herald.devinfra.process import free_port
from herald.devinfra.stack import ServiceProcess, Stack
from herald.devinfra.tls import development_certificate

QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
# What the last step only shows, the test insists on.
CHECKS = 'test "$STATUS" = sent\n'


def quickstart_script() -> str:
    blocks = BLOCK.findall(QUICKSTART.read_text())
    return "set -euo pipefail\n" + "\n".join(blocks) + CHECKS


def test_every_curl_of_the_quick_start_is_in_the_script():
    text = QUICKSTART.read_text()
    script = quickstart_script()
    shown = {line.strip() for line in text.splitlines() if "curl " in line}
    run = {line.strip() for line in script.splitlines() if "curl " in line}
    only_shown = {line for line in shown - run if not line.startswith("export CURL_CA_BUNDLE")}
    assert not only_shown, f"curl lines outside ```bash blocks: {only_shown}"
    assert len(run) >= 10
    for step in ("/signup", "/login", "/lists", "/contacts", "/compose", "/send", "/tracking"):
        assert step in script, step


@dataclass(frozen=True)
class HttpsGateway:
    url: str
    ca_file: Path


@pytest.fixture(scope="module")
async def https_gateway(
    platform: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[HttpsGateway]:
    """A second gateway in front of the same services, with HTTPS as `make run` sets it up."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = development_certificate(directory)
    https_port = free_port()
    env = platform.service_env("gateway") | {
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_TLS_PORT": str(https_port),
        "TLS_CERT_FILE": str(cert),
        "TLS_KEY_FILE": str(key),
    }
    process = ServiceProcess("gateway", env, platform.logs_dir / "https-gateway.log", None)
    await process.start()
    gateway = HttpsGateway(f"https://127.0.0.1:{https_port}", directory / "ca.pem")
    try:
        trust = ssl.create_default_context(cafile=str(gateway.ca_file))
        async with httpx.AsyncClient(base_url=gateway.url, verify=trust) as client:
            for _ in range(300):
                assert process.alive, f"see {platform.logs_dir}/https-gateway.log"
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            else:
                pytest.fail("the HTTPS gateway did not become ready")
        yield gateway
    finally:
        await process.stop()


async def test_the_quick_start_works_word_for_word(platform: Stack):
    await _run_quickstart(platform, {"HERALD": platform.url("gateway")})


async def test_the_quick_start_works_word_for_word_over_https(
    platform: Stack, https_gateway: HttpsGateway
):
    # As the page says: trust the development authority, point HERALD at the HTTPS port.
    await _run_quickstart(
        platform, {"HERALD": https_gateway.url, "CURL_CA_BUNDLE": str(https_gateway.ca_file)}
    )


async def _run_quickstart(platform: Stack, overrides: dict[str, str]) -> None:
    assert shutil.which("jq"), "Debian's jq is required (make test installs it)"
    assert shutil.which("curl"), "curl is required (make test installs it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env |= {
        "SINK": platform.sink_url,
        "ME": f"qs{uuid.uuid4().hex[:12]}@example.com",
        **overrides,
    }
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        quickstart_script(),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 300)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    transcript = output.decode(errors="replace")
    (platform.logs_dir / "quickstart.txt").write_text(transcript)
    assert process.returncode == 0, transcript[-6000:]
    assert "status: sent" in transcript
