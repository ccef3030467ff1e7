"""Schemathesis against the merged `/openapi.json` of the running platform, authenticated.

A bounded number of generated requests per operation (`SCHEMATHESIS_MAX_EXAMPLES`, default 10)
in every phase (examples, coverage, fuzzing, stateful links; `SCHEMATHESIS_PHASES` narrows
them), as a real confirmed user. Checked: no answer is a 5xx, and every answer matches the
schema documented for its status. The run uses a client address of its own, so its failed logins
never lock out other tests. No `--max-time`: given a time budget, schemathesis fuzzes until it
is spent instead of stopping at the example count.

Run in a subprocess (the `schemathesis` CLI): its Hypothesis settings and warnings stay out of
this test session.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile

import httpx

from herald.devinfra.stack import Stack
from tests.gateway.conftest import Account

CHECKS = "not_a_server_error,response_schema_conformance"
PHASES = os.environ.get("SCHEMATHESIS_PHASES", "examples,coverage,fuzzing,stateful")
# Logging out would end the session whose token the run uses, for every later request.
EXCLUDED = ["/logout"]


async def test_the_public_api_holds_to_its_documents(
    platform: Stack, account: Account, gateway: httpx.AsyncClient
):
    assert (await gateway.get("/openapi.json")).status_code == 200
    max_examples = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "10")
    client_address = f"10.77.{random.randrange(250)}.{random.randrange(1, 250)}"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        platform.url("gateway") + "/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        max_examples,
        "--request-timeout",
        "20",
        "--header",
        f"Authorization: Bearer {account.access_token}",
        "--header",
        f"X-Forwarded-For: {client_address}",
        "--phases",
        PHASES,
        "--workers",
        "2",
        # Shrinking a failure to its smallest form costs minutes; the report shows the failure.
        "--no-shrink",
        "--no-color",
    ]
    for path in EXCLUDED:
        command += ["--exclude-path", path]
    # Every request and answer, for a post-mortem (HERALD_KEEP_TEST_DATA=1 keeps the logs).
    command += ["--report", "har", "--report-har-path", str(platform.logs_dir / "schemathesis.har")]
    with tempfile.TemporaryDirectory() as workdir:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        )
        output, _ = await asyncio.wait_for(process.communicate(), 420)
    report = output.decode(errors="replace")
    (platform.logs_dir / "schemathesis.txt").write_text(report)
    assert process.returncode == 0, report[-12000:]
    assert "Tested:" in report
