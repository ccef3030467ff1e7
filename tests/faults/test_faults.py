"""The platform under faults: each scenario sends a list email while one thing goes wrong, and
every active recipient must get exactly one copy, no suppressed one any, and the email's status
and counts (campaign, tracking) must say what the SMTP sink holds.

One platform of their own (free ports, own data directory) serves all scenarios, which restart
PostgreSQL and the broker last. `HERALD_FAULTS_HEAVY=1` runs the issue's sizes and outage
durations; `bench/faults_report.py` prints the same ledgers as a table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from herald.devinfra.stack import Stack
from tests.faults.harness import HEAVY, Settings, fault_stack, run_scenario
from tests.faults.scenarios import SCENARIOS

pytestmark = pytest.mark.timeout(1800 if HEAVY else 300)


@pytest.fixture(scope="module")
async def faults_platform() -> AsyncIterator[Stack]:
    async with fault_stack() as stack:
        yield stack


# Scenarios known to fail, by name, with the reason: strict xfail, so a fix shows up as a failure
# that asks for the mark to be removed. None at present.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True))
        if name in KNOWN_FAILURES
        else name
        for name in SCENARIOS
    ],
)
async def test_every_active_recipient_gets_exactly_one_copy(faults_platform: Stack, name: str):
    ledger = await run_scenario(faults_platform, Settings.from_env(), name, SCENARIOS[name])
    print(ledger)
    assert ledger.problems == [], ledger
