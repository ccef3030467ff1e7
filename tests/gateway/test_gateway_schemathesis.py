"""Schemathesis against the merged `/openapi.json` of the running platform, authenticated.

A bounded number of generated requests per operation (`SCHEMATHESIS_MAX_EXAMPLES`, default 10)
in every phase (examples, coverage, fuzzing, stateful links; `SCHEMATHESIS_PHASES` narrows
them), as a real confirmed user; the administrators' read-only views as the administrator (their
writes stay with the user and are checked for their 403: given the administrator, generated
calls would disable or reset the accounts other tests log in with). Path ids are the user's own
list, contact and draft, so calls reach the services' logic rather than a 404. Checked: no
answer is a 5xx, every answer matches the schema documented for its status, every operation of
the document was tested, and the stateful phase followed links. The run uses a client address
of its own, so its failed logins never lock out other tests. No `--max-time`: given a time
budget, schemathesis fuzzes until it is spent instead of stopping at the example count.

Run in a subprocess (the `schemathesis` CLI): its Hypothesis settings and warnings stay out of
this test session.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import httpx

from herald.devinfra.stack import Stack
from tests.gateway.conftest import Account

CHECKS = "not_a_server_error,response_schema_conformance"
PHASES = os.environ.get("SCHEMATHESIS_PHASES", "examples,coverage,fuzzing,stateful")
# Logging out, or deleting a session the stateful phase found in GET /sessions, would end the
# session whose token the run uses: access tokens die with their session, so every later
# request would be a 401. Both are covered by tests/e2e/test_accounts_revocation.py.
EXCLUDED = ["/logout", "/sessions/{session_id}"]


def _config(client_address: str, ids: dict[str, str]) -> str:
    """schemathesis.toml: headers for everyone, the administrator's for admin reads, path ids.

    Tokens come from the environment (`${...}`), so they are never written to disk."""
    user = {"Authorization": "Bearer ${HERALD_USER_TOKEN}", "X-Forwarded-For": client_address}
    admin = user | {"Authorization": "Bearer ${HERALD_ADMIN_TOKEN}"}

    def table(values: dict[str, str]) -> str:
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in values.items()) + " }"
        )

    parameters = "\n".join(f'"path.{name}" = {json.dumps(value)}' for name, value in ids.items())
    return (
        f"headers = {table(user)}\n\n[parameters]\n{parameters}\n\n"
        # One include and one exclude: two includes would match either (GET anywhere).
        '[[operations]]\ninclude-path-regex = "^/admin"\n'
        'exclude-method-regex = "(?i)^(post|put|patch|delete)$"\n'
        f"headers = {table(admin)}\n"
    )


async def _own_ids(gateway: httpx.AsyncClient, account: Account) -> dict[str, str]:
    async def made(path: str, body: dict[str, object]) -> str:
        response = await gateway.post(path, json=body, headers=account.headers)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    list_id = await made("/lists", {"name": "schemathesis"})
    return {
        "list_id": list_id,
        "contact_id": await made(
            "/contacts", {"email": "st-contact@example.com", "list_ids": [list_id]}
        ),
        "email_id": await made("/compose", {"subject": "st", "text": "t", "list_ids": [list_id]}),
    }


async def test_the_public_api_holds_to_its_documents(
    platform: Stack, account: Account, gateway: httpx.AsyncClient
):
    document = await gateway.get("/openapi.json")
    assert document.status_code == 200
    paths = document.json()["paths"]
    admin = await gateway.post(
        "/login",
        json={"email": "admin@herald.example", "password": platform.secrets["ADMIN_PASSWORD"]},
        headers={"X-Forwarded-For": f"10.78.{random.randrange(250)}.{random.randrange(1, 250)}"},
    )
    assert admin.status_code == 200, admin.text
    excluded = list(EXCLUDED)
    max_examples = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "10")
    client_address = f"10.77.{random.randrange(250)}.{random.randrange(1, 250)}"
    ids = await _own_ids(gateway, account)
    tokens = {
        "HERALD_USER_TOKEN": account.access_token,
        "HERALD_ADMIN_TOKEN": admin.json()["access_token"],
    }
    config = _config(client_address, ids)
    har = platform.logs_dir / "schemathesis.har"
    code, report = await _schemathesis(
        platform, config, tokens, excluded, phases=PHASES, max_examples=max_examples, har=har
    )
    (platform.logs_dir / "schemathesis.txt").write_text(report)
    if code != 0 and _only_generator_errors(report):
        # Schemathesis's own data generator sometimes raises mid-run (an error inside its
        # negative syntax fuzzing, not an answer of ours): once more, with a fresh seed.
        first = report
        code, report = await _schemathesis(
            platform, config, tokens, excluded, phases=PHASES, max_examples=max_examples, har=har
        )
        (platform.logs_dir / "schemathesis-again.txt").write_text(report)
        assert code == 0, _errors_first(report) + "\n\nThe run before:\n" + _errors_first(first)
    assert code == 0, _errors_first(report)
    # Every operation of the document was selected and tested, none skipped.
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected, report[-4000:]
    assert tested, report[-4000:]
    operations = sum(
        method in ("get", "put", "post", "patch", "delete", "head", "options")
        for path, item in paths.items()
        if path not in excluded
        for method in item
    )
    assert int(selected.group(1)) == int(tested.group(1)) == operations, report[-4000:]
    if "stateful" in PHASES:
        links = _links_covered(report)
        if links == 0:
            # Which links a stateful run follows is chance: with few examples it may take none
            # (generated bodies the services refuse end a scenario). Once more, longer, alone.
            code, again = await _schemathesis(
                platform,
                config,
                tokens,
                excluded,
                phases="stateful",
                max_examples=str(3 * int(max_examples)),
                har=platform.logs_dir / "schemathesis-stateful.har",
            )
            (platform.logs_dir / "schemathesis-stateful.txt").write_text(again)
            assert code == 0, again[-12000:]
            links = _links_covered(again)
        assert links > 0, report[-4000:]
    # Administrators' reads were made as the administrator (the run warns of ops only ever
    # answered 401/403 by name).
    warned = report.split("Authentication failed", 1)[-1].split("\n\n", 2)
    assert "Authentication failed" not in report or "GET /admin" not in warned[1], report


def _errors_section(report: str) -> str:
    """The report's ERRORS section (what raised, with its traceback), or ''."""
    match = re.search(r"=+ ERRORS =+\n(.*?)\n\s*Need more help\?", report, re.S)
    return match.group(1) if match else ""


def _only_generator_errors(report: str) -> bool:
    """The run failed only because schemathesis raised inside itself: no check failed and every
    error is a "Runtime Error" (an answer of ours that breaks a check is a failure; a service
    that does not answer is a "Network Error")."""
    summary = re.search(r"\nErrors:\n((?:[ \t]+\S.*\n)+)", report)
    if summary is None or "unique failure" in report:
        return False
    return all("Runtime Error" in line for line in summary.group(1).splitlines())


def _errors_first(report: str) -> str:
    """What to show when a run fails: its errors in full, then the end of the report (the
    check failures and the summary)."""
    errors = _errors_section(report)
    if len(errors) > 4000:  # each error's message leads, its exception ends the traceback
        errors = errors[:1500] + "\n[...]\n" + errors[-2500:]
    return errors + "\n[...]\n" + report[-6000:]


def _links_covered(report: str) -> int:
    links = re.search(r"API Links:\s+(\d+) covered", report)
    assert links, report[-4000:]
    return int(links.group(1))


async def _schemathesis(
    platform: Stack,
    config_text: str,
    tokens: dict[str, str],
    excluded: list[str],
    *,
    phases: str,
    max_examples: str,
    har: Path,
) -> tuple[int, str]:
    """One schemathesis CLI run; its exit code and report."""
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "schemathesis.toml"
        config.write_text(config_text)
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            platform.url("gateway") + "/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            max_examples,
            "--request-timeout",
            "20",
            "--phases",
            phases,
            "--workers",
            "2",
            # Shrinking a failure to its smallest form costs minutes; the report shows it.
            "--no-shrink",
            "--no-color",
        ]
        for path in excluded:
            command += ["--exclude-path", path]
        if seed := os.environ.get("SCHEMATHESIS_SEED"):
            command += ["--seed", seed]  # to replay a run whose report printed its seed
        # Every request and answer, for a post-mortem (HERALD_KEEP_TEST_DATA=1 keeps the logs).
        command += ["--report", "har", "--report-har-path", str(har)]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        environment |= tokens
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=environment,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 420)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")
