"""CSV imports: the upload streamed to disk, then a background job per file.

The upload is parsed as it arrives (python-multipart's streaming parser) and its file part is
written straight to disk, so memory stays flat whatever the size; the encoding and the header
row are checked before the job is accepted, so those mistakes are answered at once with a 4xx.

A job reads the file in chunks (in a thread, so the event loop keeps answering), checks each
row, and COPYs the good ones into a temporary staging table; the rows whose address comes again
later in the file are dropped there (and named in the job), then one statement applies the rest,
with the list memberships and the job's final counts, in the same transaction. An import is
therefore applied entirely or not at all: a job that fails, or whose service stops or dies
part way, changes no contact and no list, and says so in its `failure_reason`.

Each replica holds a PostgreSQL advisory lock named after its runner id for as long as it
lives. A job whose runner no longer holds that lock (the process died with it) is marked
failed by the next replica to look (at start and every `reap_interval` seconds); its file
lived on the dead replica's disk, so it cannot be resumed and must be uploaded again.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from contacts import domain, store
from contacts.config import Settings
from contacts.metrics import IMPORT_ROWS, IMPORT_SECONDS, IMPORTS
from herald import db
from herald.errors import ApiError
from herald.service import Runtime, Worker

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

# The first key of the runners' advisory locks ("HCIM"): keeps them apart from other locks.
LOCK_NAMESPACE = 0x4843494D
ENCODINGS = {
    "utf-8": "utf-8-sig",
    "utf-16": "utf-16",  # with a byte order mark, as spreadsheets write it
    "utf-16-le": "utf-16-le",
    "utf-16-be": "utf-16-be",
    "windows-1252": "cp1252",
    "iso-8859-1": "latin-1",
}
DELIMITERS = {",", ";", "\t", "|"}
MAX_FIELD = 4 * 1024 * 1024
# No contact's row is longer than the longest field may be (lines, not records: a quoted field
# may span lines). More than the size inspect_file reads at a time.
MAX_LINE = MAX_FIELD
STOPPED = "the service stopped during the import; nothing was changed: upload the file again"
DIED = (
    "the service running the import stopped or crashed part way; nothing was changed:"
    " upload the file again"
)

# An import that created or updated this many contacts refreshes the planner's statistics.
ANALYZE_AFTER = 10_000

# Rows are checked in Python, a cell at most a few MB; the csv module's default is 128 kB.
csv.field_size_limit(MAX_FIELD)


def _bad(field: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, "invalid_import", message, field=field)


# -- the upload -----------------------------------------------------------------------------------


@dataclass
class Upload:
    """What a `POST /contacts/import` carried: the file (on disk) and the small fields."""

    path: Path
    filename: str | None = None
    size: int = 0
    has_file: bool = False
    fields: dict[str, str] = field(default_factory=dict)


class _UploadParser:
    """Feeds python-multipart's callbacks: the `file` part to disk, small fields to memory."""

    _FIELD_LIMIT = 64 * 1024

    def __init__(self, out: io.BufferedWriter, upload: Upload, max_bytes: int) -> None:
        self._out = out
        self._upload = upload
        self._max_bytes = max_bytes
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()
        self.error: ApiError | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._value = bytearray()
        self._name = None
        self._is_file = False

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self._upload.has_file:
                self.error = _bad("file", "send one file")
                return
            self._is_file = True
            self._upload.has_file = True
            filename = options.get(b"filename")
            if filename:
                self._upload.filename = filename.decode("utf-8", "replace")[-200:]

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        if self._is_file:
            self._upload.size += end - start
            if self._upload.size > self._max_bytes:
                self.error = _bad("file", f"the file is larger than {self._max_bytes} bytes", 413)
                return
            self._out.write(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > self._FIELD_LIMIT:
            self.error = _bad(self._name or "body", "this field is too long")

    def _part_end(self) -> None:
        if self._name and not self._is_file and self.error is None:
            self._upload.fields[self._name] = self._value.decode("utf-8", "replace")


async def receive_upload(request: Request, path: Path, *, max_bytes: int) -> Upload:
    """Stream a multipart/form-data body, its `file` part into `path`."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            415, "unsupported_media_type", "send the CSV as multipart/form-data", field="file"
        )
    upload = Upload(path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        handler = _UploadParser(out, upload, max_bytes)
        parser = MultipartParser(boundary, handler.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if handler.error is not None:
                    raise handler.error
            parser.finalize()
        except MultipartParseError as exc:
            raise _bad("body", f"not a readable multipart body: {exc}") from None
    if handler.error is not None:
        raise handler.error
    if not upload.has_file:
        raise _bad("file", "no file: send the CSV in a part named `file`")
    return upload


@dataclass(frozen=True)
class Options:
    """How to read an uploaded file."""

    encoding: str
    delimiter: str
    mapping: dict[str, str]


def options_from(fields: dict[str, str]) -> Options:
    """The reading options from the form's fields, or a 422 naming the field."""
    encoding = fields.get("encoding", "utf-8").strip().lower()
    if encoding not in ENCODINGS:
        raise _bad("encoding", f"one of {', '.join(sorted(ENCODINGS))}")
    delimiter = fields.get("delimiter", ",")
    if delimiter == "\\t":
        delimiter = "\t"
    if delimiter not in DELIMITERS:
        raise _bad("delimiter", "one of , ; | or a tab")
    mapping: dict[str, str] = {}
    if fields.get("columns", "").strip():
        try:
            mapping = orjson.loads(fields["columns"])
        except orjson.JSONDecodeError:
            raise _bad("columns", "a JSON object from header name to field") from None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise _bad("columns", "a JSON object from header name to field")
    return Options(encoding=ENCODINGS[encoding], delimiter=delimiter, mapping=mapping)


def inspect_file(path: Path, options: Options) -> domain.ColumnPlan:
    """Check the whole file decodes and the header says where the addresses are.

    Runs in a thread; raises a 422 ApiError naming `file` (or `columns`).
    """
    decoder = codecs.getincrementaldecoder(options.encoding)(errors="strict")
    line = 1
    run = 0  # bytes since the last line break
    with path.open("rb") as raw:
        while chunk := raw.read(1 << 20):
            # A line longer than a row may be is refused now, not half way through the job.
            # Lines inside one chunk are shorter than MAX_LINE: only the one across chunks counts.
            first = chunk.find(b"\n")
            run += len(chunk) if first < 0 else first
            if run > MAX_LINE:
                raise _bad("file", f"line {line} is longer than {MAX_LINE} bytes: is it CSV?")
            if first >= 0:
                run = len(chunk) - chunk.rfind(b"\n") - 1
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = line + chunk[: exc.start].count(b"\n")
                name = "utf-8" if options.encoding == "utf-8-sig" else options.encoding
                raise _bad(
                    "file",
                    f"line {at} is not valid {name} ({exc.reason}); save the file as UTF-8"
                    " or say its `encoding`",
                ) from None
            except UnicodeError:
                # Python's utf-16 and utf-32 codecs refuse a stream without a byte order mark.
                raise _bad(
                    "file",
                    f"the file does not start with a {options.encoding} byte order mark;"
                    " say `utf-16-le`/`utf-16-be` or save the file as UTF-8",
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _bad("file", "the file ends in the middle of a character") from None
    with _rows(path, options) as rows:
        try:
            header = next(rows, None)
        except csv.Error as exc:
            raise _bad("file", f"the header row is not CSV: {exc}") from None
    if not header or not any(h.strip() for h in header):
        raise _bad("file", "the file is empty: it needs a header row and at least one row")
    header = [h.strip() for h in header]
    try:
        return domain.plan_columns(header, options.mapping)
    except domain.BadColumns as exc:
        raise _bad("columns" if options.mapping else "file", str(exc)) from None


def _may_hold_nul(path: Path, options: Options) -> bool:
    """Whether a cell of the file may hold a NUL: looked for once, so rows need not be."""
    if options.encoding.startswith("utf-16"):
        return True  # zero bytes are in most characters; the rows are checked one by one
    with path.open("rb") as raw:
        while chunk := raw.read(1 << 20):
            if b"\x00" in chunk:
                return True
    return False


@contextlib.contextmanager
def _rows(path: Path, options: Options) -> Iterator[Iterator[list[str]]]:
    with path.open("r", encoding=options.encoding, errors="strict", newline="") as text:
        yield csv.reader(text, delimiter=options.delimiter)


# -- the job --------------------------------------------------------------------------------------


class ImportFailed(Exception):
    """The file turned out unreadable part way; the reason is for the job's `failure_reason`."""


@dataclass
class Chunk:
    records: list[domain.StagedRow]
    done: bool


class RowReader:
    """Reads checked rows in chunks; keeps the count and the first errors. Not thread-safe:
    one `read` at a time."""

    def __init__(
        self, path: Path, options: Options, plan: domain.ColumnPlan, *, keep_errors: int
    ) -> None:
        self._stack = contextlib.ExitStack()
        self._rows = self._stack.enter_context(_rows(path, options))
        self._plan = plan
        self._keep = keep_errors
        self._nul_free = not _may_hold_nul(path, options)
        next(self._rows)  # the header
        self.row_no = 1  # as a spreadsheet numbers rows: the header is row 1
        self.rows_read = 0
        self.error_count = 0
        self.errors: list[dict[str, object]] = []
        # Whether every staged address is ASCII (then Python and PostgreSQL fold them alike).
        self.ascii_addresses = True

    def read(self, size: int) -> Chunk:
        records: list[domain.StagedRow] = []
        stage = domain.stage_row
        plan = self._plan
        nul_free = self._nul_free
        # Counted in locals, kept at the end of the chunk: this loop runs once per row.
        row_no = self.row_no
        rows_read = self.rows_read
        try:
            for fields in self._rows:
                row_no += 1
                if not fields:
                    continue  # a blank line
                rows_read += 1
                staged = stage(plan, row_no, fields, nul_free=nul_free)
                if isinstance(staged, domain.RowError):
                    self.error_count += 1
                    if len(self.errors) < self._keep:
                        self.errors.append(staged.as_dict())
                    continue
                records.append(staged)
                if len(records) >= size:
                    self._note_addresses(records)
                    return Chunk(records, done=False)
        except csv.Error as exc:
            raise ImportFailed(f"row {row_no + 1} is not CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ImportFailed(f"near row {row_no + 1}: {exc.reason}") from None
        finally:
            self.row_no = row_no
            self.rows_read = rows_read
        self._note_addresses(records)
        return Chunk(records, done=True)

    def _note_addresses(self, records: list[domain.StagedRow]) -> None:
        # Once per chunk, in C: joined, the chunk's addresses are checked at memory speed.
        if self.ascii_addresses:
            self.ascii_addresses = "".join(record[1] for record in records).isascii()

    def close(self) -> None:
        self._stack.close()


@dataclass(frozen=True)
class Job:
    id: uuid.UUID
    account_id: uuid.UUID
    list_id: uuid.UUID | None
    path: Path
    options: Options
    plan: domain.ColumnPlan


class Importer:
    """Runs this replica's imports, at most `concurrency` at once, and reaps dead replicas'."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self.settings = settings
        self.runner = uuid.uuid4()
        self.directory = Path(settings.import_dir)
        self._slots = asyncio.Semaphore(settings.import_concurrency)
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._lock_conn: asyncpg.Connection | None = None

    def upload_path(self, job_id: uuid.UUID) -> Path:
        return self.directory / f"{self.runner}-{job_id}.csv"

    async def hold_lock(self) -> None:
        """(Re)take this runner's liveness lock on a connection of its own."""
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            return
        conn = await db.connect(self.settings.database_url, schema=self.settings.db_schema)
        await store.hold_runner_lock(conn, namespace=LOCK_NAMESPACE, runner=self.runner)
        self._lock_conn = conn

    async def reap(self) -> list[uuid.UUID]:
        """Fail the jobs of runners that died, and delete their files if they were here."""
        async with self._pool.acquire() as conn:
            reaped = await store.reap_orphaned_jobs(conn, namespace=LOCK_NAMESPACE, reason=DIED)
        for job_id in reaped:
            IMPORTS.labels("failed").inc()
            for leftover in self.directory.glob(f"*-{job_id}.csv"):
                leftover.unlink(missing_ok=True)
        if reaped:
            log.warning("failed imports of a runner that died", extra={"jobs": len(reaped)})
        return reaped

    async def keep_watch(self) -> None:
        """Keep the liveness lock and reap periodically, for the life of the service."""
        while True:
            await asyncio.sleep(self.settings.import_reap_interval)
            try:
                await self.hold_lock()
                await self.reap()
            except Exception as exc:
                log.warning("import reaper could not run", extra={"error": repr(exc)})

    def submit(self, job: Job) -> None:
        """Run `job` in the background."""
        task = asyncio.create_task(self._run(job), name=f"import-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))

    async def wait_idle(self) -> None:
        """Until no import of this replica runs (tests and the benchmark use it)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def stop(self) -> None:
        """Cancel running imports (their transactions roll back) and mark them failed."""
        tasks = dict(self._tasks)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if tasks:
            async with self._pool.acquire() as conn:
                for job_id in tasks:
                    await store.fail_job(conn, job_id=job_id, reason=STOPPED)
                    IMPORTS.labels("failed").inc()
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                await self._lock_conn.close(timeout=2)

    async def _run(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            async with self._slots:
                await self._import(job)
            IMPORTS.labels("succeeded").inc()
        except ImportFailed as exc:
            await self._fail(job, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("import failed", extra={"job_id": str(job.id)})
            await self._fail(job, f"the import failed on an internal error ({type(exc).__name__})")
        finally:
            job.path.unlink(missing_ok=True)
            IMPORT_SECONDS.observe(time.perf_counter() - started)

    async def _fail(self, job: Job, reason: str) -> None:
        IMPORTS.labels("failed").inc()
        async with self._pool.acquire() as conn:
            await store.fail_job(conn, job_id=job.id, reason=reason)

    async def _import(self, job: Job) -> None:
        reader = await asyncio.to_thread(
            RowReader, job.path, job.options, job.plan, keep_errors=self.settings.import_keep_errors
        )
        try:
            async with self._pool.acquire() as conn:
                await store.start_job(conn, job_id=job.id)
                async with conn.transaction():
                    await store.create_staging(conn)
                    started = time.perf_counter()
                    await self._stage(conn, reader, job)
                    staged = time.perf_counter()
                    duplicate_count, duplicates = await store.drop_duplicates(
                        conn,
                        keep=self.settings.import_keep_errors,
                        ascii_addresses=reader.ascii_addresses,
                    )
                    created, updated = await store.apply_import(
                        conn,
                        account_id=job.account_id,
                        list_id=job.list_id,
                        staged=reader.rows_read - reader.error_count - duplicate_count,
                    )
                    applied = time.perf_counter()
                    await store.finish_job(
                        conn,
                        job_id=job.id,
                        rows_read=reader.rows_read,
                        created=created,
                        updated=updated,
                        error_count=reader.error_count,
                        errors=reader.errors,
                        duplicate_count=duplicate_count,
                        duplicates=duplicates,
                    )
        finally:
            reader.close()
        log.info(
            "import applied",
            extra={
                "job_id": str(job.id),
                "rows": reader.rows_read,
                "stage_seconds": round(staged - started, 3),
                "upsert_seconds": round(applied - staged, 3),
            },
        )
        IMPORT_ROWS.labels("created").inc(created)
        IMPORT_ROWS.labels("updated").inc(updated)
        IMPORT_ROWS.labels("skipped").inc(reader.rows_read - created - updated)
        if created + updated >= ANALYZE_AFTER:
            await self._analyze(job)

    async def _analyze(self, job: Job) -> None:
        # `q` is answered by walking the account's contacts in id order or through the search
        # indexes, as the statistics suggest; until autovacuum refreshes them (a minute or
        # more) a large import leaves them wrong, and a wrong choice costs a second per page.
        try:
            async with self._pool.acquire() as conn:
                await store.analyze_contacts(conn, memberships=job.list_id is not None)
        except Exception as exc:  # the import is applied: nothing here may fail it
            log.warning("could not analyze after an import", extra={"error": repr(exc)})

    async def _stage(self, conn: db.Conn, reader: RowReader, job: Job) -> None:
        """COPY the file's good rows into staging, reading the next chunk while one is sent."""
        size = self.settings.import_chunk_rows
        next_chunk = asyncio.ensure_future(asyncio.to_thread(reader.read, size))
        last_report = time.monotonic()
        while True:
            chunk = await next_chunk
            if not chunk.done:
                next_chunk = asyncio.ensure_future(asyncio.to_thread(reader.read, size))
            try:
                if chunk.records:
                    await store.copy_staged(conn, records=chunk.records)
            except BaseException:
                if not chunk.done:
                    next_chunk.cancel()
                    with contextlib.suppress(BaseException):
                        await next_chunk
                raise
            if chunk.done:
                return
            if time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                async with self._pool.acquire() as progress:
                    await store.job_progress(
                        progress,
                        job_id=job.id,
                        rows_read=reader.rows_read,
                        error_count=reader.error_count,
                        errors=reader.errors,
                    )


def importer_worker(settings: Settings) -> Worker:
    """Starts this replica's importer: its liveness lock, a first reaping, the periodic one."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        importer = Importer(runtime.db, settings)
        importer.directory.mkdir(parents=True, exist_ok=True)
        await importer.hold_lock()
        await importer.reap()
        runtime.extras["importer"] = importer
        watch = runtime.start_task(importer.keep_watch(), "import-reaper")

        async def reaper_alive() -> bool:
            return not watch.done()

        runtime.checks["import_reaper"] = reaper_alive
        try:
            yield
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await importer.stop()

    return worker
