"""Open-pixel throughput of the tracking service against a bare ASGI app, in one run, with wrk.

Both are served the same way (uvicorn, uvloop, httptools, one process) and loaded by the same
wrk script cycling over many signed open tokens, in alternating rounds (the medians are
reported, so a change in the machine's other load hits both sides alike). The bare app answers
the same GIF and does nothing else; the tracking service verifies each token, judges the agent,
buffers the open and writes it in batches. Afterwards every open the service answered (its own
request counter) must be in the roll-ups. Needs Debian's `wrk`.

On a machine shared with other work the request rates swing with its load, so the CPU time each
side spent per answered request (from /proc: the process and any process under it; the tracking
service's includes the writing of its batches and the outbox relay) is reported beside them: the
steadier figure of what an open costs. What PostgreSQL and the broker spent on the same opens
(they share the machine's cores with both sides) is reported too.

    .venv/bin/python bench/tracking_pixel.py [--seconds 8] [--rounds 3] [--connections 64]
        [--env TRACKING_FLUSH_BATCH=5000 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import uvicorn

from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.links import LinkSigner, OpenToken
from tracking.hotpath import PIXEL

MESSAGES = 2000

# Prints one parsable line when wrk is done: requests, non-2xx/3xx answers, p50/p99 in µs.
WRK_SCRIPT = """
local paths = {}
local n = 0
for line in io.lines("%(paths)s") do n = n + 1; paths[n] = line end
local i = 0
request = function()
  i = i %% n + 1
  return wrk.format("GET", paths[i], {["User-Agent"] = "Mozilla/5.0 (X11; Linux) Chrome/130"})
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


async def bare_app(scope: dict[str, object], receive: object, send: object) -> None:
    """The baseline: the same GIF and headers, nothing else."""
    if scope["type"] != "http":
        return
    await send(  # type: ignore[operator]
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"image/gif"),
                (b"content-length", str(len(PIXEL)).encode()),
                (b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0, private"),
                (b"pragma", b"no-cache"),
                (b"expires", b"0"),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": PIXEL})  # type: ignore[operator]


def serve_bare(port: int) -> None:
    uvicorn.run(
        bare_app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
    )


async def wrk(url: str, script: Path, seconds: float, connections: int) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(int(seconds), 1)}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    found = re.search(rb"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if found is None:
        raise RuntimeError(f"wrk said: {out.decode(errors='replace')}")
    requests, errors, p50, p99, duration = (int(x) for x in found.groups())
    return {
        "requests": requests,
        "errors": errors,
        "rate": requests / (duration / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
    }


async def answered_opens(url: str) -> float:
    text = (await httpx.AsyncClient().get(f"{url}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("herald_http_requests_total{")
            and 'route="/t/o/{token}"' in line
            and 'status="200"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process and every process under it have used so far, the
    ended ones included (Linux): a service's worker processes count as the service."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue  # ended in between: its time is in its parent's children figures
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for task in tasks:
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return total


async def measured(
    pid: int,
    url: str,
    script: Path,
    seconds: float,
    connections: int,
    *,
    settle: float,
    infrastructure: tuple[int, ...] = (),
) -> dict[str, float]:
    """One wrk round, with the CPU time `pid` (and its worker processes) spent per request
    (`settle` seconds after the load ends count too: the tracking service writes what it
    answered then), and what the `infrastructure` processes (database, broker) spent."""
    before = cpu_seconds(pid)
    before_infra = sum(cpu_seconds(p) for p in infrastructure)
    run = await wrk(url, script, seconds, connections)
    await asyncio.sleep(settle)
    requests = max(run["requests"], 1)
    run["cpu_us"] = (cpu_seconds(pid) - before) / requests * 1e6
    run["infra_us"] = (sum(cpu_seconds(p) for p in infrastructure) - before_infra) / requests * 1e6
    return run


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


async def main(seconds: float, rounds: int, connections: int, env: dict[str, str]) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")
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
            env={"LOG_LEVEL": "WARNING", **env},
        )
    )
    bare_port = free_port()
    bare = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-bare", str(bare_port)
    )
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        await stack.start_service("tracking")
        await stack.wait_ready(90, ["tracking"])
        signer = LinkSigner.from_spec(stack.secrets["LINK_SIGNING_KEYS"])
        account, email = uuid.uuid4(), uuid.uuid4()
        paths = data_dir / "paths.txt"
        paths.write_text(
            "\n".join(
                "/t/o/"
                + signer.sign("open", OpenToken(m=f"<{n}.{email}@bench>", e=email, a=account))
                for n in range(MESSAGES)
            )
        )
        script = data_dir / "pixel.lua"
        script.write_text(WRK_SCRIPT % {"paths": paths})
        tracking = stack.url("tracking")
        bare_url = f"http://127.0.0.1:{bare_port}"
        # Warm both (and the tracking service's flush path) before measuring.
        await wrk(bare_url, script, 2, connections)
        await wrk(tracking, script, 2, connections)
        baselines, ours = [], []
        service = stack.services["tracking"].process
        assert service is not None
        assert stack.postgres is not None
        assert stack.broker is not None
        postmaster = int((stack.postgres.data_dir / "postmaster.pid").read_text().split()[0])
        infrastructure = (postmaster, *([stack.broker.pid] if stack.broker.pid else []))
        for _ in range(rounds):
            baselines.append(
                await measured(bare.pid, bare_url, script, seconds, connections, settle=0)
            )
            ours.append(
                await measured(
                    service.pid,
                    tracking,
                    script,
                    seconds,
                    connections,
                    settle=1.5,
                    infrastructure=infrastructure,
                )
            )
        answered = await answered_opens(tracking)
        conn = await asyncpg.connect(stack.database_url)
        try:
            recorded, waited = 0, time.monotonic()
            while time.monotonic() - waited < 60:
                recorded = await conn.fetchval(
                    "SELECT coalesce(sum(opens), 0) FROM tracking.email_stats WHERE email_id = $1",
                    email,
                )
                if recorded >= answered:
                    break
                await asyncio.sleep(0.2)
            lag = time.monotonic() - waited
            dropped = await httpx.AsyncClient().get(f"{tracking}/metrics")
            drops = sum(
                float(line.rsplit(" ", 1)[1])
                for line in dropped.text.splitlines()
                if line.startswith("herald_tracking_events_dropped_total{")
            )
        finally:
            await conn.close()
    finally:
        bare.terminate()
        await bare.wait()
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    for name, runs in (("bare ASGI app:   ", baselines), ("tracking service:", ours)):
        print(
            f"{name} {median(runs, 'rate'):8.0f} req/s, p50 {median(runs, 'p50_ms'):.2f} ms,"
            f" p99 {median(runs, 'p99_ms'):.2f} ms (medians of {rounds} rounds;"
            f" req/s per round {', '.join(str(round(r['rate'])) for r in runs)});"
            f" {sum(r['errors'] for r in runs):.0f} errors"
        )
    ratios = [o["rate"] / b["rate"] for o, b in zip(ours, baselines, strict=True)]
    print(
        f"ratio {median(ours, 'rate') / median(baselines, 'rate'):.2f} (aim >= 0.7; per round"
        f" {', '.join(f'{r:.2f}' for r in ratios)}); wrk -t1 -c{connections} -d{seconds:.0f}s,"
        f" {MESSAGES} different tokens, one uvicorn process each, on {os.cpu_count()} cores"
    )
    bare_cpu, our_cpu = median(baselines, "cpu_us"), median(ours, "cpu_us")
    print(
        f"CPU per request: bare {bare_cpu:.0f} µs, tracking service {our_cpu:.0f} µs (writing"
        f" included); ratio {bare_cpu / our_cpu:.2f} (medians); PostgreSQL and the broker"
        f" {median(ours, 'infra_us'):.0f} µs more per open"
    )
    verdict = "every answered open is in the roll-ups" if recorded == answered else "MISMATCH"
    print(
        f"opens answered by the service (incl. warm-up): {answered:.0f}; in the roll-ups:"
        f" {recorded}; dropped: {drops:.0f}; written within {lag:.1f} s of the load ending"
        f" -> {verdict}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-bare":
        serve_bare(int(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the services (e.g. TRACKING_FLUSH_BATCH=5000), repeatable",
    )
    options = parser.parse_args()
    settings = dict(item.split("=", 1) for item in options.env)
    asyncio.run(main(options.seconds, options.rounds, options.connections, settings))
