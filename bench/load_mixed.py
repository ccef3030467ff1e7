"""A mixed load on the gateway of a whole platform, at rising concurrency until latency breaks.

The platform is started as `make run` starts it (every service a process, embedded PostgreSQL,
broker and SMTP sink), with the gateway's rate limits off (they would measure themselves).
Real accounts sign up and confirm from the mailed link; each gets a list of contacts and sends
one campaign to it, whose mails in the sink give real pixel and click links. Then wrk cycles
through a shuffled mix of the calls people and mail clients make:

    logins, contact reads (list, one) and writes (create, change), composes, sends (one
    recipient each), pixel and click hits, report reads

at each concurrency of a doubling ramp, an equal share of `--minutes` each. Access tokens are
renewed before each step (they live 10 minutes). The baseline is the first (lowest) step; the
knee is the last step whose p99 stays under `--p99-factor` times the baseline's and whose
throughput still grew. Printed: each step's throughput and p50/p99 (with ratios against the
baseline), the knee, failed calls (any status >= 400, socket errors, timeouts) below it, and the
resident memory of every service before the ramp and after it, once the backlog drained. The
load generator shares the machine's cores with the platform. Needs Debian's `wrk`.

    .venv/bin/python bench/load_mixed.py [--minutes 2] [--accounts 8] [--max-concurrency 256]
        [--p99-factor 5] [--skip report,login]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig

PASSWORD = "bench-orbit-candle-92-harbor"
CONTACTS_PER_ACCOUNT = 20
LINES = 20_000  # requests in the shuffled mix wrk cycles through
# Share of each kind of call in the mix.
MIX = {
    "login": 1,
    "contacts_list": 14,
    "contact_read": 12,
    "contact_create": 8,
    "contact_update": 6,
    "compose": 5,
    "send": 4,
    "pixel": 25,
    "click": 15,
    "report": 10,
}
CLICK_HTML = (
    "<p>Hi {{ contact.first_name }}</p>"
    '<p><a href="https://example.com/pricing">Pricing</a> '
    '<a href="https://example.com/blog?id=7">Blog</a></p>'
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
)

# One request per line: method, path, bearer token, JSON body; `{n}` in a body becomes a
# number unique to the thread and call. Prints per-status counts and totals when done.
WRK_SCRIPT = r"""
local reqs = {}
local n = 0
for line in io.lines("%(lines)s") do
  local method, path, token, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
  n = n + 1
  reqs[n] = {method, path, token, body}
end
local threads = {}
local counter = 0

setup = function(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

init = function(args)
  i = math.random(n)
  statuses = {}
end

request = function()
  i = i %% n + 1
  local r = reqs[i]
  local headers = {["User-Agent"] = "Mozilla/5.0 (X11; Linux) Chrome/130"}
  if r[3] ~= "" then headers["Authorization"] = "Bearer " .. r[3] end
  local body = nil
  if r[4] ~= "" then
    counter = counter + 1
    body = r[4]:gsub("{n}", tid .. "x" .. counter)
    headers["Content-Type"] = "application/json"
  end
  return wrk.format(r[1], r[2], headers, body)
end

response = function(status, headers, body)
  if status >= 400 then
    statuses[status] = (statuses[status] or 0) + 1
  end
end

done = function(summary, latency, requests)
  local failed = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for status, count in pairs(counts) do
      failed[#failed + 1] = status .. "=" .. count
    end
  end
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d %%s\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write, e.timeout, table.concat(failed, ",")))
end
"""


@dataclass
class Account:
    email: str
    token: str = ""
    list_id: str = ""
    contact_ids: tuple[str, ...] = ()


@dataclass
class Step:
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    status_failures: int
    socket_errors: int
    timeouts: int
    statuses: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def failures(self) -> int:
        return self.status_failures + self.socket_errors + self.timeouts


async def sign_up(gateway: httpx.AsyncClient, sink: httpx.AsyncClient) -> Account:
    """Sign up, confirm from the mailed link, as a new user does."""
    tag = uuid.uuid4().hex[:10]
    account = Account(f"load{tag}@example.com")
    response = await gateway.post(
        "/signup", json={"username": f"load{tag}", "email": account.email, "password": PASSWORD}
    )
    response.raise_for_status()
    deadline = time.monotonic() + 60
    while not (found := (await sink.get("/api/messages", params={"to": account.email})).json())[
        "items"
    ]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no confirmation mail for {account.email}")
        await asyncio.sleep(0.3)
    mail = (await sink.get(f"/api/messages/{found['items'][0]['id']}")).json()
    token = re.search(r"/signup/confirm\?token=([\w\-.~%]+)", mail["text"])
    if token is None:
        raise RuntimeError("no confirmation link in the mail")
    (await gateway.get("/signup/confirm", params={"token": token.group(1)})).raise_for_status()
    await log_in(gateway, account)
    return account


async def log_in(gateway: httpx.AsyncClient, account: Account) -> None:
    response = await gateway.post("/login", json={"email": account.email, "password": PASSWORD})
    response.raise_for_status()
    account.token = response.json()["access_token"]


async def furnish(gateway: httpx.AsyncClient, account: Account) -> None:
    """A list of contacts, and a campaign sent to it (its mails carry pixels and links)."""
    headers = {"Authorization": f"Bearer {account.token}"}
    the_list = await gateway.post("/lists", json={"name": "load"}, headers=headers)
    the_list.raise_for_status()
    account.list_id = the_list.json()["id"]
    people = [
        {
            "email": f"c{i}-{uuid.uuid4().hex[:8]}@example.com",
            "first_name": f"Reader{i}",
            "list_ids": [account.list_id],
        }
        for i in range(CONTACTS_PER_ACCOUNT)
    ]
    created = await gateway.post("/contacts", json=people, headers=headers)
    created.raise_for_status()
    account.contact_ids = tuple(i["contact"]["id"] for i in created.json()["items"])
    # Campaign's copy of the verified sender follows the confirmation by a moment.
    deadline = time.monotonic() + 60
    while True:
        draft = await gateway.post(
            "/compose",
            json={
                "subject": "Load {{ contact.first_name }}",
                "html": CLICK_HTML,
                "list_ids": [account.list_id],
                "from_email": account.email,
            },
            headers=headers,
        )
        if draft.status_code == 201 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    draft.raise_for_status()
    sent = await gateway.post("/send", json={"email_id": draft.json()["id"]}, headers=headers)
    sent.raise_for_status()


async def tracking_paths(sink: httpx.AsyncClient, want: int) -> tuple[list[str], list[str]]:
    """Pixel and click paths from the campaign mails in the sink."""
    pixels: list[str] = []
    clicks: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        listing = (await sink.get("/api/messages", params={"limit": 1000})).json()["items"]
        ids = [m["id"] for m in listing if (m["subject"] or "").startswith("Load ")]
        if len(ids) >= want:
            break
        await asyncio.sleep(0.5)
    for message_id in ids:
        html = (await sink.get(f"/api/messages/{message_id}")).json()["html"] or ""
        pixels += re.findall(r"https?://[^/\"]+(/t/o/[^\"'\s]+)", html)
        clicks += re.findall(r"https?://[^/\"]+(/t/c/[^\"'\s]+)", html)
    if not pixels or not clicks:
        raise RuntimeError("no tracking links in the campaign mails")
    return pixels, clicks


def mix_lines(
    accounts: list[Account], pixels: list[str], clicks: list[str], skip: set[str]
) -> list[str]:
    """The shuffled request mix for wrk, with the accounts' current tokens."""
    mix = {kind: share for kind, share in MIX.items() if kind not in skip}
    kinds = random.choices(list(mix), weights=list(mix.values()), k=LINES)
    # wrk numbers calls from 1 in each run: new addresses must differ between runs too.
    run = uuid.uuid4().hex[:6]
    lines = []
    for kind in kinds:
        account = random.choice(accounts)
        contact = random.choice(account.contact_ids)
        token = account.token
        method, path, body = "GET", "", ""
        if kind == "login":
            method, path, token = "POST", "/login", ""
            body = json.dumps({"email": account.email, "password": PASSWORD})
        elif kind == "contacts_list":
            path = f"/contacts?limit=50&list_id={account.list_id}"
        elif kind == "contact_read":
            path = f"/contacts/{contact}"
        elif kind == "contact_create":
            method, path = "POST", "/contacts"
            body = json.dumps({"email": f"new-{run}-{{n}}@example.com", "first_name": "New"})
        elif kind == "contact_update":
            method, path = "PATCH", f"/contacts/{contact}"
            body = json.dumps({"last_name": random.choice(["Ng", "Ode", "Ruiz"])})
        elif kind == "compose":
            method, path = "POST", "/compose"
            body = json.dumps({"subject": "Draft {n}", "html": CLICK_HTML, "tags": ["load"]})
        elif kind == "send":
            method, path = "POST", "/send"
            body = json.dumps(
                {"to": ["rcpt-{n}@example.com"], "subject": "Receipt {n}", "text": "Thanks."}
            )
        elif kind == "pixel":
            path, token = random.choice(pixels), ""
        elif kind == "click":
            path, token = random.choice(clicks), ""
        elif kind == "report":
            path = "/reports?interval=day"
        lines.append(f"{method}\t{path}\t{token}\t{body}")
    return lines


async def run_wrk(url: str, script: Path, seconds: float, concurrency: int) -> Step:
    threads = str(min(2, concurrency))
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t",
        threads,
        "-c",
        str(concurrency),
        "-d",
        f"{seconds:.0f}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    found = re.search(rb"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) ?(\S*)", out)
    if found is None:
        raise RuntimeError(f"wrk said: {out.decode(errors='replace')}")
    requests, duration_us, p50, p99, status, sockets, timeouts = map(int, found.groups()[:7])
    statuses: dict[str, int] = {}
    for pair in found.group(8).decode().split(","):
        if pair:
            code, count = pair.split("=")
            statuses[code] = statuses.get(code, 0) + int(count)
    return Step(
        concurrency,
        requests,
        duration_us / 1e6,
        p50 / 1000,
        p99 / 1000,
        status,
        sockets,
        timeouts,
        " ".join(f"{code}x{count}" for code, count in sorted(statuses.items())),
    )


def rss_mib(stack: Stack) -> dict[str, float]:
    """Resident memory of each service's process (and any children it started)."""
    sizes: dict[str, float] = {}
    for name in SERVICES:
        service = stack.services.get(name)
        if service is None or service.process is None:
            continue
        total = 0
        pending = [service.process.pid]
        while pending:
            pid = pending.pop()
            status = Path(f"/proc/{pid}/status")
            if not status.exists():
                continue
            found = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
            total += int(found.group(1)) if found else 0
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = (task / "children").read_text().split()
                pending += [int(child) for child in children]
        sizes[name] = total / 1024
    return sizes


async def wait_drained(stack: Stack, timeout: float) -> None:
    """Until the sink stops receiving: the sends of the run are delivered."""
    async with httpx.AsyncClient(base_url=stack.sink_url, timeout=30) as sink:
        last, quiet_since, deadline = -1, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = (await sink.get("/api/messages/count")).json()["count"]
            if count != last:
                last, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since > 5:
                return
            await asyncio.sleep(1)


def knee(steps: list[Step], p99_factor: float) -> Step:
    """The last step before latency breaks (p99 past the factor) or throughput stops growing."""
    baseline = steps[0]
    best = baseline
    for step in steps[1:]:
        if step.p99_ms > p99_factor * baseline.p99_ms or step.rate < best.rate * 1.05:
            break
        if step.failures:
            break
        best = step
    return best


async def main(
    minutes: float, accounts_wanted: int, max_concurrency: int, factor: float, skip: set[str]
) -> int:
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: `make wrk` (or apt-get install -y wrk)")
    ramp = [c for c in (4, 8, 16, 32, 64, 128, 256, 512, 1024) if c <= max_concurrency]
    seconds = max(5.0, minutes * 60 / len(ramp))
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
                "LOG_LEVEL": "WARNING",
                "RATE_LIMIT_IP_PER_SECOND": "0",
                "RATE_LIMIT_ACCOUNT_PER_SECOND": "0",
                "KAFKA_SESSION_TIMEOUT_MS": "6000",
            },
        )
    )
    steps: list[Step] = []
    try:
        started = time.monotonic()
        await stack.start(120)
        gateway_url = stack.url("gateway")
        async with (
            httpx.AsyncClient(base_url=gateway_url, timeout=60) as gateway,
            httpx.AsyncClient(base_url=stack.sink_url, timeout=60) as sink,
        ):
            accounts = list(
                await asyncio.gather(*(sign_up(gateway, sink) for _ in range(accounts_wanted)))
            )
            await asyncio.gather(*(furnish(gateway, a) for a in accounts))
            pixels, clicks = await tracking_paths(sink, accounts_wanted * CONTACTS_PER_ACCOUNT)
            print(
                f"platform up and furnished in {time.monotonic() - started:.0f} s: "
                f"{len(accounts)} accounts x {CONTACTS_PER_ACCOUNT} contacts, "
                f"{len(pixels)} pixel and {len(clicks)} click links"
            )
            lines_file = data_dir / "mix.tsv"
            script = data_dir / "mix.lua"
            script.write_text(WRK_SCRIPT % {"lines": lines_file})
            # Warm up (connections, caches, JIT-less but lazy imports), then measure memory.
            lines_file.write_text("\n".join(mix_lines(accounts, pixels, clicks, skip)) + "\n")
            await run_wrk(gateway_url, script, 10, 8)
            await wait_drained(stack, 120)
            before = rss_mib(stack)
            for concurrency in ramp:
                await asyncio.gather(*(log_in(gateway, a) for a in accounts))
                lines_file.write_text("\n".join(mix_lines(accounts, pixels, clicks, skip)) + "\n")
                step = await run_wrk(gateway_url, script, seconds, concurrency)
                steps.append(step)
                print(
                    f"  {concurrency:>5} connections: {step.rate:7.0f} requests/s  "
                    f"p50 {step.p50_ms:7.1f} ms  p99 {step.p99_ms:7.1f} ms  "
                    f"failed {step.failures} {step.statuses}",
                    flush=True,
                )
                if step.p99_ms > 4 * factor * steps[0].p99_ms and len(steps) > 2:
                    break  # far past the knee: more connections only queue
            await wait_drained(stack, 300)
            after = rss_mib(stack)
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    baseline, best = steps[0], knee(steps, factor)
    print(
        f"mixed load, {seconds:.0f} s per step ({sum(s.seconds for s in steps) / 60:.1f} min); "
        f"baseline = {baseline.concurrency} connections"
    )
    for step in steps:
        ratio = step.rate / baseline.rate
        print(
            f"  {step.concurrency:>5} conn  {step.rate:7.0f} req/s ({ratio:4.2f}x)"
            f"  p99 {step.p99_ms:7.1f} ms ({step.p99_ms / baseline.p99_ms:5.1f}x)"
            f"  failed {step.failures} {step.statuses}"
        )
    below = [s for s in steps if s.concurrency <= best.concurrency]
    print(
        f"knee: {best.concurrency} connections, {best.rate:.0f} requests/s "
        f"({best.rate / baseline.rate:.2f}x baseline), p99 {best.p99_ms:.1f} ms "
        f"({best.p99_ms / baseline.p99_ms:.1f}x baseline); failed below and at the knee: "
        f"{sum(s.failures for s in below)} of {sum(s.requests for s in below)}"
    )
    print("resident memory (MiB) before the ramp -> after it, drained:")
    for name in before:
        grown = after.get(name, 0) - before[name]
        print(
            f"  {name:<11} {before[name]:7.1f} -> {after.get(name, 0):7.1f}  "
            f"({grown:+.1f}, {after.get(name, 0) / before[name]:.2f}x)"
        )
    return 1 if sum(s.failures for s in below) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=2, help="length of the ramp (issue: 5)")
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument(
        "--p99-factor", type=float, default=5, help="p99 growth over the baseline that breaks"
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated kinds left out of the mix: {', '.join(MIX)}"
    )
    options = parser.parse_args()
    skipped = {kind for kind in options.skip.split(",") if kind}
    if skipped - set(MIX):
        parser.error(f"unknown kinds: {', '.join(sorted(skipped - set(MIX)))}")
    sys.exit(
        asyncio.run(
            main(
                options.minutes,
                options.accounts,
                options.max_concurrency,
                options.p99_factor,
                skipped,
            )
        )
    )
