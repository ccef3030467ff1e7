"""The fault drills of `tests/faults/`, at the issue's sizes, as a table: one row per scenario.

Run: `.venv/bin/python bench/faults_report.py [--light] [--only broker ...]`.

One platform of its own (embedded PostgreSQL, broker, SMTP sink, every service on free ports)
takes a list email through each scenario: first without a fault (the baseline), then each fault
of issue 9. For each it prints what campaign counted as sent, what the sink received (active
recipients with a copy), extra copies, active recipients without one, suppressed recipients who
got one, the email's final status, and the send's duration against the baseline's. Default
sizes are the heavy ones (`HERALD_FAULTS_HEAVY=1` in the tests); `--light` runs the test sizes.
Exits 1 if any scenario fell short; what it fell short of is listed under the table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

# Run as a script (`python bench/faults_report.py`, which `python -m bench` does), the repo root
# is not on the path, and the scenarios live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.harness import Ledger, Scenario, Settings, fault_stack, run_scenario
from tests.faults.scenarios import SCENARIOS, no_fault

BASELINE = "0 no fault (baseline)"
COLUMNS = (
    f"{'scenario':<24} {'active':>6} {'supp.':>5} {'sent':>6} {'received':>8} {'dupl.':>5}"
    f" {'missing':>7} {'supp.recv':>9} {'status':>8} {'seconds':>8} {'x base':>6}"
)


def row(ledger: Ledger, baseline: float) -> str:
    ratio = ledger.seconds / baseline if baseline else 0.0
    return (
        f"{ledger.scenario:<24} {ledger.active:>6} {ledger.suppressed:>5} {ledger.sent:>6}"
        f" {ledger.received:>8} {ledger.duplicates:>5} {ledger.missing:>7}"
        f" {ledger.suppressed_received:>9} {ledger.status:>8} {ledger.seconds:>8.1f}"
        f" {ratio:>6.2f}"
    )


async def main(heavy: bool, only: list[str]) -> int:
    settings = Settings.from_env(heavy=heavy)
    chosen: dict[str, Scenario] = {BASELINE: no_fault}
    chosen |= {n: s for n, s in SCENARIOS.items() if not only or any(o in n for o in only)}
    print(
        f"{settings.contacts} contacts (every {settings.suppress_every}th suppressed); relay"
        f" refuses {settings.relay_refused_seconds:g} s then defers"
        f" {settings.relay_deferring_seconds:g} s; PostgreSQL down"
        f" {settings.postgres_down_seconds:g} s; broker down {settings.broker_down_seconds:g} s",
        flush=True,
    )
    ledgers: list[Ledger] = []
    async with fault_stack() as stack:
        print(COLUMNS, flush=True)
        for name, scenario in chosen.items():
            try:
                ledger = await run_scenario(stack, settings, name, scenario)
            except Exception as exc:  # a drill that could not run is a row too
                ledger = Ledger(name, 0, 0, status="error", problems=[repr(exc)])
            ledgers.append(ledger)
            print(row(ledger, ledgers[0].seconds), flush=True)
    failed = [ledger for ledger in ledgers if ledger.problems]
    for ledger in failed:
        print(f"\n{ledger.scenario}:")
        for problem in ledger.problems:
            print(f"  - {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--light", action="store_true", help="the sizes `make test` runs")
    parser.add_argument("--only", nargs="*", default=[], help="scenarios whose name contains …")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(not args.light, args.only)))
