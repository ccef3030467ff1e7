"""CSV import and deep paging of the contacts service, on this machine, in one run.

Import: a CSV of `--rows` contacts is uploaded through the gateway and imported; the baseline
is a bare `COPY ... FROM STDIN (FORMAT csv)` of the same file into a plain table of the same
PostgreSQL, measured in the same run. A second figure, the floor, COPYs the file into a copy of
`contacts.contacts` made with `LIKE ... INCLUDING ALL` (its columns, defaults, checks and every
index it has now): what PostgreSQL needs to keep those indexes, before any checking or
upserting. Then each index alone: the seconds it adds to the bare COPY. The service's peak
memory (RSS) is sampled throughout, and its CPU time during the import. The same addresses are
then imported again, with other first names, onto a new list: every row changes a contact and
adds a membership.

Paging: `GET /contacts?limit=50` through the gateway, page one against the page at 90% depth
(depth 900,000 of 1,000,000 at the default size), sequential requests, p50 and p99; then `q=`
searches: a prefix of one address, of one first name (rows/5000 contacts), and a prefix that
every contact's first name has.

    .venv/bin/python bench/contacts_import.py [--rows 1000000] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil

from auth.tokens import SigningKey, issue_access_token
from contacts.domain import encode_cursor
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig

DOMAINS = [f"mail{i}.example.com" for i in range(300)] + ["gmail.com", "outlook.com"]
PLANS = ["free", "pro", "team", "enterprise"]


def write_csv(path: Path, rows: int, *, first: str = "First") -> None:
    """A realistic file: a few hundred domains, names, two attribute columns."""
    rng = random.Random(7)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,first_name,last_name,plan,city\r\n")
        for i in range(rows):
            domain = rng.choice(DOMAINS)
            names = f"{first}{i % 5000},Last{i % 7919}"
            out.write(f"user.{i}@{domain},{names},{PLANS[i % 4]},City{i % 97}\r\n")


async def bare_copy(database_url: str, path: Path) -> float:
    """Seconds for a bare COPY of the file into a plain table (the baseline)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS public.bench_bare_copy")
        await conn.execute(
            """CREATE TABLE public.bench_bare_copy (email text, first_name text, last_name text,
                                                   plan text, city text)"""
        )
        started = time.perf_counter()
        await conn.copy_to_table(
            "bench_bare_copy", source=path, schema_name="public", format="csv", header=True
        )
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE public.bench_bare_copy")
        return elapsed
    finally:
        await conn.close()


# The floor's ids: one UUIDv7 and a counter, as the import makes them (uuidv7() per row would
# cost more than some indexes).
_FLOOR_ID = (
    "contacts.import_contact_id('019a0000-0000-7000-8000-000000000000',"
    " nextval('public.bench_floor_ids')::integer)"
)


async def indexed_copy(database_url: str, path: Path, index: str | None = None) -> float:
    """Seconds for a COPY of the file into a table shaped as contacts are: with every index of
    `contacts.contacts` (the floor), or with none but `index` (its name)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS public.bench_indexed_copy")
        await conn.execute("DROP SEQUENCE IF EXISTS public.bench_floor_ids")
        await conn.execute("CREATE SEQUENCE public.bench_floor_ids")
        including = "ALL" if index is None else "DEFAULTS INCLUDING CONSTRAINTS"
        await conn.execute(
            f"""CREATE TABLE public.bench_indexed_copy
                    (LIKE contacts.contacts INCLUDING {including}, plan text, city text)"""
        )
        await conn.execute(
            f"""ALTER TABLE public.bench_indexed_copy
                    ALTER account_id SET DEFAULT '00000000-0000-0000-0000-000000000001',
                    ALTER id SET DEFAULT {_FLOOR_ID}"""
        )
        if index is not None:
            definition = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'contacts' AND indexname = $1",
                index,
            )
            await conn.execute(
                definition.replace(" ON contacts.contacts ", " ON public.bench_indexed_copy ")
            )
        started = time.perf_counter()
        await conn.copy_to_table(
            "bench_indexed_copy",
            source=path,
            schema_name="public",
            columns=["email", "first_name", "last_name", "plan", "city"],
            format="csv",
            header=True,
        )
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE public.bench_indexed_copy")
        await conn.execute("DROP SEQUENCE public.bench_floor_ids")
        return elapsed
    finally:
        await conn.close()


async def contact_indexes(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT indexname FROM pg_indexes
                WHERE schemaname = 'contacts' AND tablename = 'contacts' ORDER BY indexname"""
        )
    finally:
        await conn.close()
    return [r["indexname"] for r in rows]


async def sample_memory(pid: int, stop: asyncio.Event) -> int:
    """The highest RSS of process `pid` until `stop`, sampled every 50 ms."""
    process = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.05)
    return peak


async def run_import(
    client: httpx.AsyncClient, headers: dict[str, str], path: Path, list_id: str | None = None
) -> tuple[float, float, dict[str, object]]:
    """(seconds to upload and get 202, seconds until the job finished, the job)."""
    started = time.perf_counter()
    with path.open("rb") as file:
        response = await client.post(
            "/contacts/import",
            headers=headers,
            files={"file": ("bench.csv", file, "text/csv")},
            data={"list_id": list_id} if list_id else None,
        )
    response.raise_for_status()
    accepted = time.perf_counter() - started
    job_id = response.json()["job_id"]
    while True:
        job = (await client.get(f"/contacts/import/{job_id}", headers=headers)).json()
        if job["status"] in ("succeeded", "failed"):
            return accepted, time.perf_counter() - started, job
        await asyncio.sleep(0.1)


async def page_latencies(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    cursor: str | None,
    requests: int,
    q: str | None = None,
    items: int = 50,
) -> list[float]:
    params = {"limit": "50", **({"cursor": cursor} if cursor else {}), **({"q": q} if q else {})}
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        response = await client.get("/contacts", params=params, headers=headers)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        assert len(response.json()["items"]) == items, (q, len(response.json()["items"]))
    return latencies


async def cursor_at(database_url: str, account_id: uuid.UUID, depth: int) -> str:
    """The cursor that starts a page after the first `depth` contacts of the account."""
    conn = await asyncpg.connect(database_url)
    try:
        last = await conn.fetchval(
            """SELECT id FROM contacts.contacts WHERE account_id = $1
                ORDER BY id OFFSET $2 LIMIT 1""",
            account_id,
            depth - 1,
        )
    finally:
        await conn.close()
    return encode_cursor(last)


def import_phases(log: Path) -> list[str]:
    """What the service logged about each job: seconds staging (read, check, COPY), upserting."""
    return [
        f"{fields['stage_seconds']} s read+check+COPY, {fields['upsert_seconds']} s upsert"
        for fields in (
            orjson.loads(line)
            for line in log.read_text().splitlines()
            if '"import applied"' in line
        )
    ]


def ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def main(rows: int, requests: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    data_dir.chmod(0o755)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={s: free_port() for s in SERVICES},
            pg_port=free_port(),
            broker_port=free_port(),
            sink_smtp_port=free_port(),
            sink_http_port=free_port(),
            durable=False,
            env={
                "LOG_LEVEL": "INFO",
                "CONTACTS_IMPORT_DIR": str(data_dir / "imports"),
                # Sequential requests measure the service; the gateway's limits would cut them off.
                "RATE_LIMIT_IP_PER_SECOND": "0",
                "RATE_LIMIT_ACCOUNT_PER_SECOND": "0",
            },
        )
    )
    csv_path = data_dir / "contacts.csv"
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        for name in ("auth", "contacts", "gateway"):
            await stack.start_service(name)
        await stack.wait_ready(90, ["auth", "contacts"])
        await asyncio.to_thread(write_csv, csv_path, rows)
        changed_path = data_dir / "changed.csv"
        await asyncio.to_thread(write_csv, changed_path, rows, first="Second")
        size_mb = csv_path.stat().st_size / 1e6
        bare = await bare_copy(stack.database_url, csv_path)
        floor = await indexed_copy(stack.database_url, csv_path)
        each = {
            index: await indexed_copy(stack.database_url, csv_path, index)
            for index in await contact_indexes(stack.database_url)
        }

        account = uuid.uuid4()
        key = SigningKey.from_pem(stack.secrets["JWT_PRIVATE_KEY"])
        token = issue_access_token(
            key,
            user_id=account,
            role="user",
            issuer="herald",
            audience="herald-api",
            ttl_seconds=3600,
        ).token
        headers = {"Authorization": f"Bearer {token}"}
        contacts = stack.services["contacts"].process
        assert contacts is not None
        service = psutil.Process(contacts.pid)
        rss_before = service.memory_info().rss
        cpu_before = service.cpu_times()
        async with httpx.AsyncClient(base_url=stack.url("gateway"), timeout=600) as client:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(contacts.pid, stop))
            accepted, total, job = await run_import(client, headers, csv_path)
            stop.set()
            peak = await sampler
            cpu_after = service.cpu_times()
            cpu = sum(cpu_after[:2]) - sum(cpu_before[:2])
            if job["status"] != "succeeded":
                raise SystemExit(f"import failed: {job}")
            depth = rows * 9 // 10
            deep_cursor = await cursor_at(stack.database_url, account, depth)
            await page_latencies(client, headers, None, 20)  # warm up
            first = await page_latencies(client, headers, None, requests)
            deep = await page_latencies(client, headers, deep_cursor, requests)
            # One address; the contacts of one first name (every 5000th row); every contact.
            address = f"user.{rows // 2}@"
            named = len(range(4321, rows, 5000))
            searches = {
                f"q={address} (1 contact)": await page_latencies(
                    client, headers, None, requests, address, 1
                ),
                f"q=first4321 ({named} contacts)": await page_latencies(
                    client, headers, None, requests, "first4321", min(50, named)
                ),
                f"q=first ({rows} contacts)": await page_latencies(
                    client, headers, None, requests, "first", min(50, rows)
                ),
            }
            made = await client.post("/lists", headers=headers, json={"name": "bench"})
            made.raise_for_status()
            _, again_total, again = await run_import(
                client, headers, changed_path, made.json()["id"]
            )
            if again["status"] != "succeeded":
                raise SystemExit(f"import onto a list failed: {again}")
    finally:
        await stack.stop()
        # Read once the service has stopped: it logs a job's phases after the job is visible.
        phases = [*import_phases(stack.logs_dir / "contacts.log"), "", ""]
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"file: {rows:,} rows, {size_mb:.0f} MB")
    print(f"bare COPY (baseline): {bare:.2f} s, {rows / bare:,.0f} rows/s")
    print(
        f"COPY into a table indexed as contacts (floor): {floor:.2f} s, {rows / floor:,.0f} rows/s"
    )
    print(
        "each index alone adds to the bare COPY: "
        + ", ".join(f"{name} {seconds - bare:+.2f} s" for name, seconds in each.items())
    )
    print(
        f"import through the gateway: {total:.2f} s ({accepted:.2f} s upload and checks,"
        f" {total - accepted:.2f} s job: {phases[0]}), {rows / total:,.0f} rows/s;"
        f" created {job['created']:,}, skipped {job['skipped']:,};"
        f" ratio to bare COPY {bare / total:.2f}, to the floor {floor / total:.2f}"
    )
    print(
        f"the same addresses again, changed, onto a new list: {again_total:.2f} s"
        f" (job: {phases[1]}),"
        f" {rows / again_total:,.0f} rows/s; updated {again['updated']:,};"
        f" ratio to bare COPY {bare / again_total:.2f}"
    )
    print(
        f"contacts service RSS: {rss_before / 2**20:.0f} MiB before,"
        f" peak {peak / 2**20:.0f} MiB during the import; {cpu:.1f} s CPU"
    )
    print(
        f"GET /contacts limit=50 ({requests} sequential requests): page one p50"
        f" {ms(first, 50):.1f} ms p99 {ms(first, 99):.1f} ms; at depth {depth:,} p50"
        f" {ms(deep, 50):.1f} ms p99 {ms(deep, 99):.1f} ms"
    )
    for label, latencies in searches.items():
        print(f"  {label}: p50 {ms(latencies, 50):.1f} ms p99 {ms(latencies, 99):.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300)
    options = parser.parse_args()
    asyncio.run(main(options.rows, options.requests))
