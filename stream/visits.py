"""The visits store: people's visits to each camera kept in SQLite (a file) or PostgreSQL (a
URL), every save committed to disk (restarts, kill -9 and power loss keep it), and the counts
per camera, hour or day, age group and gender made from them, with their CSV and JSON forms."""

from __future__ import annotations

import csv
import logging
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

from stream.types import PERSON_AGE_GROUPS, SHOWN_GENDERS, UNKNOWN, CountRow, Visit

log = logging.getLogger(__name__)
_T = TypeVar("_T")

POSTGRES_SCHEMES = ("postgresql", "postgres")
SCHEMA_VERSION = 1
PERIOD_HOURS = {"hour": 1, "day": 24}
# Seconds a statement waits for another writer (SQLite's busy timeout, PostgreSQL's statement
# timeout), a connection for the server, and a thread for the store's lock.
BUSY_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT_S = 60.0
SCHEMA_LOCK_KEY = 0x61676573  # "ages": PostgreSQL's advisory lock while the schema is made

VISIT_COLUMNS = (
    "camera", "run", "person", "first_seen", "last_seen", "age", "age_low", "age_high",
    "gender", "confidence", "ended",
)  # fmt: skip
# Derived from the visit when it is saved, so that counting is a plain GROUP BY.
DERIVED_COLUMNS = ("first_hour", "age_group", "counted_gender")
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS agestream_schema (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS visits (
        camera TEXT NOT NULL,
        run TEXT NOT NULL,
        person BIGINT NOT NULL,
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        age DOUBLE PRECISION,
        age_low DOUBLE PRECISION,
        age_high DOUBLE PRECISION,
        gender TEXT,
        confidence DOUBLE PRECISION,
        ended BOOLEAN NOT NULL,
        first_hour BIGINT NOT NULL,
        age_group TEXT NOT NULL,
        counted_gender TEXT NOT NULL,
        PRIMARY KEY (camera, run, person)
    )""",
    "CREATE INDEX IF NOT EXISTS visits_first_seen ON visits (first_seen)",
    "CREATE INDEX IF NOT EXISTS visits_camera_first_seen ON visits (camera, first_seen)",
    "INSERT INTO agestream_schema (name, version) VALUES ('visits', ?)",
)
_ALL_COLUMNS = VISIT_COLUMNS + DERIVED_COLUMNS
# An open visit is saved again as it updates; once a visit has ended, only its final row
# (another ended one) may replace it, so a late periodic save cannot reopen it.
UPSERT = (
    f"INSERT INTO visits ({', '.join(_ALL_COLUMNS)}) VALUES ({', '.join('?' * len(_ALL_COLUMNS))})"
    " ON CONFLICT (camera, run, person) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _ALL_COLUMNS[3:])
    + " WHERE NOT visits.ended OR excluded.ended"
)


class StoreError(RuntimeError):
    """The visits store cannot be opened or used; the message names it and what to do."""


def redacted(target: str | Path) -> str:
    """`target` as it may be logged: a URL's password (in its user part or its query) as ***."""
    text = str(target)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _first_line(error: BaseException) -> str:
    """An exception's message on one line (libpq's run over several)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


class _Database(Protocol):
    """What the store needs of a database connection; SQL is written with `?` placeholders."""

    errors: tuple[type[Exception], ...]

    def transaction(self) -> AbstractContextManager[None]: ...

    def lock_schema(self) -> None: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def table_exists(self, name: str) -> bool: ...

    def reconnect_if_broken(self) -> bool: ...

    def close(self) -> None: ...


class _SQLite:
    """One SQLite connection in WAL mode: readers never wait for the writer, and each commit
    is synced to disk (synchronous=FULL: one fsync per save, so neither kill -9 nor power loss
    takes a committed save; NORMAL would leave the last ~30 s to the OS's write-back)."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path, create: bool) -> None:
        if path.is_dir():
            raise StoreError(
                f"visits store {path} is a folder: give a file path, such as {path / 'visits.db'}"
            )
        if not create and not path.exists():
            raise StoreError(
                f"no visits store at {path}: check the path (agestream serve makes it)"
            )
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            uri = f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"
            self.connection = sqlite3.connect(
                uri,
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,  # the store's lock serialises its threads
                isolation_level=None,  # transactions are explicit: `transaction`
            )
        except (OSError, sqlite3.Error) as error:
            raise StoreError(
                f"cannot open visits store {path}: {_first_line(error)}: check the path and its "
                "permissions"
            ) from None
        try:
            self._set_up(path)
        except sqlite3.Error as error:
            self.connection.close()
            if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                raise StoreError(
                    f"visits store {path} is not an SQLite database ({_first_line(error)}): give "
                    "a new file or one agestream made"
                ) from None
            raise StoreError(
                f"cannot open visits store {path}: {_first_line(error)}: check the path and its "
                "permissions"
            ) from None

    def _set_up(self, path: Path) -> None:
        mode = self.connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("visits store %s: WAL not available here (%s journal): slower", path, mode)
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        # IMMEDIATE: take the write lock now (waiting up to the busy timeout), not midway.
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def lock_schema(self) -> None:
        pass  # BEGIN IMMEDIATE already keeps other writers out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.connection.executemany(sql, rows)

    def table_exists(self, name: str) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return bool(self.execute(sql, (name,)))

    def reconnect_if_broken(self) -> bool:
        return False  # a file connection does not break

    def close(self) -> None:
        self.connection.close()


class _Postgres:
    """One psycopg connection in autocommit mode, made again when the server dropped it."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "a postgresql:// visits store needs psycopg: pip install 'agestream[postgres]'"
            ) from None
        self.psycopg = psycopg
        self.errors: tuple[type[Exception], ...] = (psycopg.Error,)
        self.url = url
        self.connection = self._connect()

    def _connect(self) -> Any:
        try:
            connection = self.psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="agestream visits",
            )
            connection.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_S * 1000)}")
        except self.psycopg.Error as error:
            raise StoreError(
                f"cannot connect to visits store {redacted(self.url)}: {_first_line(error)}: "
                "check that the server runs and the URL's host, port, user and database"
            ) from None
        return connection

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.connection.transaction():
            yield

    def lock_schema(self) -> None:
        # Two processes creating the tables at once would collide in PostgreSQL's catalog.
        self.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)

    def table_exists(self, name: str) -> bool:
        return self.execute("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0]

    def reconnect_if_broken(self) -> bool:
        if not (self.connection.closed or self.connection.broken):
            return False
        log.warning("visits store %s: connection lost; connecting again", redacted(self.url))
        self.connection = self._connect()
        return True

    def close(self) -> None:
        self.connection.close()


def open_store(target: str | Path, create: bool = True) -> VisitStore:
    """The visits store at `target`: a file path (SQLite; the file and its folder made when
    absent) or a postgresql:// URL (psycopg 3); its tables made when absent.

    Args:
        target: the file path or URL.
        create: False to refuse, rather than make, a store that does not exist yet.

    Raises:
        StoreError: the target cannot be used as a store (one line naming it, URL redacted).
    """
    text = str(target)
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    database: _Database
    if scheme in POSTGRES_SCHEMES:
        database = _Postgres(text)
    elif scheme:
        raise StoreError(
            f"visits store {redacted(text)}: unknown kind {scheme}://, expecting a file path "
            "(SQLite) or a postgresql:// URL"
        )
    else:
        database = _SQLite(Path(target), create)
    store = VisitStore(database, redacted(text))
    try:
        store._prepare(create)
    except BaseException:
        store.close()
        raise
    return store


class VisitStore:
    """Visits kept in a database, shared by a process's stream threads and its web server: one
    connection, one call at a time. Made by `open_store`; a context manager.

    Args:
        database: the connection.
        name: the store's path or redacted URL, for messages.
    """

    def __init__(self, database: _Database, name: str) -> None:
        self._database = database
        self.name = name
        self._lock = threading.Lock()

    def __enter__(self) -> VisitStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (committed visits are kept)."""
        with self._locked("closing"):
            self._database.close()

    @contextmanager
    def _locked(self, action: str) -> Iterator[None]:
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise StoreError(
                f"visits store {self.name}: {action} waited {LOCK_TIMEOUT_S:.0f} s for another "
                "thread's call: the database is too slow or stuck"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _run(self, action: str, work: Callable[[_Database], _T]) -> _T:
        """`work` under the lock, once more on a new connection when the server dropped the
        old one (every call is safe to repeat: reads and upserts); StoreError when it fails."""
        database = self._database
        with self._locked(action):
            try:
                try:
                    return work(database)
                except database.errors:
                    if not database.reconnect_if_broken():
                        raise
                return work(database)
            except database.errors as error:
                raise StoreError(
                    f"visits store {self.name}: {action} failed: {_first_line(error)}"
                ) from None

    def _prepare(self, create: bool) -> None:
        """Make the tables when absent (unless not `create`); check the schema version."""

        def prepare(database: _Database) -> None:
            with database.transaction():
                database.lock_schema()
                found = database.table_exists("agestream_schema") and database.execute(
                    "SELECT version FROM agestream_schema WHERE name = 'visits'"
                )
                if found:
                    self._check_version(found[0][0])
                elif not create:
                    raise StoreError(
                        f"no visits store at {self.name}: it holds no agestream visits tables; "
                        "check the target (agestream serve makes them)"
                    )
                else:
                    for statement in SCHEMA:
                        database.execute(statement, (SCHEMA_VERSION,) if "?" in statement else ())

        self._run("opening", prepare)

    def _check_version(self, version: int) -> None:
        # A later schema change migrates older versions here, before anything reads them.
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"visits store {self.name} has schema version {version}, this agestream knows "
                f"version {SCHEMA_VERSION}: use the agestream that made it, or a newer one"
            )

    def save(self, visits: Sequence[Visit]) -> None:
        """Insert or update `visits` in one transaction, keyed by (camera, run, person): an open
        visit saved again replaces its earlier row; an ended visit is replaced only by another
        ended row."""
        rows = [_visit_row(visit) for visit in visits]
        if not rows:
            return

        def write(database: _Database) -> None:
            with database.transaction():
                database.execute_many(UPSERT, rows)

        self._run(f"saving {len(rows)} visits", write)

    def end_earlier(self, camera: str, run: str) -> list[Visit]:
        """End the visits of `camera` that another incarnation left open (it was killed, or the
        power went), as of their last saved sighting; the visits it ended. Called when
        `camera` starts as `run`."""
        where = "camera = ? AND run <> ? AND NOT ended"
        select = f"SELECT {', '.join(VISIT_COLUMNS)} FROM visits WHERE {where}"
        update = f"UPDATE visits SET ended = ? WHERE {where}"

        def write(database: _Database) -> list[tuple[Any, ...]]:
            with database.transaction():
                found = database.execute(select, (camera, run))
                database.execute(update, (True, camera, run))
            return found

        found = self._run(f"ending {camera}'s earlier visits", write)
        return [_visit(row[:-1] + (True,)) for row in found]

    def counts(
        self, start: float, end: float, camera: str | None = None, by: str = "hour"
    ) -> list[CountRow]:
        """People first seen in [start, end) (unix seconds), per camera, UTC hour or day
        (`by`), age group and counted gender; sorted by camera, period, age group
        (PERSON_AGE_GROUPS order, UNKNOWN last) and gender (SHOWN_GENDERS order, UNKNOWN last).
        """
        if by not in PERIOD_HOURS:
            raise ValueError(f"Invalid by {by!r}, expecting one of: {', '.join(PERIOD_HOURS)}")
        _check_window(start, end)
        hours = PERIOD_HOURS[by]
        # Integer division of the integer hour: the same buckets in SQLite and PostgreSQL.
        where, params = _window(start, end, camera)
        sql = (
            f"SELECT camera, first_hour / {hours}, age_group, counted_gender, COUNT(*) "
            f"FROM visits WHERE {where} GROUP BY 1, 2, 3, 4"
        )
        found = self._run("counting", lambda database: database.execute(sql, params))
        rows = [
            CountRow(camera, float(bucket * hours * 3600), by, age_group, gender, int(people))
            for camera, bucket, age_group, gender, people in found
        ]
        return sorted(rows, key=_count_order)

    def visits(
        self, start: float, end: float, camera: str | None = None, limit: int = 1000
    ) -> list[Visit]:
        """Up to `limit` visits first seen in [start, end), earliest first."""
        _check_window(start, end)
        if limit < 1:
            raise ValueError(f"visits limit must be at least 1, got {limit}")
        where, params = _window(start, end, camera)
        sql = (
            f"SELECT {', '.join(VISIT_COLUMNS)} FROM visits WHERE {where} "
            "ORDER BY first_seen, camera, run, person LIMIT ?"
        )
        found = self._run(
            "reading visits", lambda database: database.execute(sql, (*params, limit))
        )
        return [_visit(row) for row in found]

    def cameras(self) -> list[str]:
        """The cameras that have visits, sorted."""
        found = self._run(
            "listing cameras",
            lambda database: database.execute("SELECT DISTINCT camera FROM visits"),
        )
        return sorted(camera for (camera,) in found)


def _visit(row: Sequence[Any]) -> Visit:
    """A visit from its VISIT_COLUMNS row (SQLite keeps a boolean as 0 or 1)."""
    return Visit(**{**dict(zip(VISIT_COLUMNS, row)), "ended": bool(row[-1])})


def _window(start: float, end: float, camera: str | None) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause and its parameters for visits first seen in [start, end), of `camera`
    or (None) of every camera."""
    if camera is None:
        return "first_seen >= ? AND first_seen < ?", (start, end)
    return "first_seen >= ? AND first_seen < ? AND camera = ?", (start, end, camera)


def _check_window(start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end) and start < end):
        raise ValueError(f"expected finite start < end (unix seconds), got {start} and {end}")


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _visit_row(visit: Visit) -> tuple[Any, ...]:
    """A visit's column values (plain Python types: trackers hand out numpy numbers), then its
    derived ones: its first hour (whole hours since the epoch), age group and counted gender."""
    if not (math.isfinite(visit.first_seen) and math.isfinite(visit.last_seen)):
        raise ValueError(
            f"visit {visit.camera}/{visit.run}/{visit.person}: first_seen and last_seen must be "
            f"finite unix seconds, got {visit.first_seen} and {visit.last_seen}"
        )
    age = _finite_or_none(visit.age)
    return (
        str(visit.camera), str(visit.run), int(visit.person),
        float(visit.first_seen), float(visit.last_seen),
        age, _finite_or_none(visit.age_low), _finite_or_none(visit.age_high),
        visit.gender, _finite_or_none(visit.confidence), bool(visit.ended),
        math.floor(visit.first_seen / 3600), UNKNOWN if age is None else visit.age_group,
        visit.counted_gender,
    )  # fmt: skip


def _rank(name: str, order: Sequence[str]) -> tuple[int, str]:
    """Where `name` sorts: its place in `order`, then UNKNOWN, then other names by name."""
    if name in order:
        return order.index(name), name
    return (len(order), name) if name == UNKNOWN else (len(order) + 1, name)


def _count_order(row: CountRow) -> tuple[Any, ...]:
    return (
        row.camera, row.start, _rank(row.age_group, PERSON_AGE_GROUPS),
        _rank(row.gender, SHOWN_GENDERS),
    )  # fmt: skip


COUNT_FIELDS = ("camera", "start_utc", "period", "age_group", "gender", "people")


def utc_iso(seconds: float, timespec: str = "seconds") -> str:
    """Unix seconds as ISO 8601 UTC with a Z, to `timespec` (datetime.isoformat's):
    2026-12-03T14:00:00Z."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def utc_seconds(text: str) -> float:
    """Unix seconds of an ISO 8601 date or time, UTC unless it names a zone; ValueError for
    anything else."""
    try:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except OverflowError as error:  # a year beyond what the platform's clock holds
        raise ValueError(str(error)) from None


def counts_csv(rows: Iterable[CountRow], file: TextIO) -> None:
    """`rows` as CSV: a COUNT_FIELDS header, then one line per row."""
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(COUNT_FIELDS)
    writer.writerows(
        (row.camera, utc_iso(row.start), row.period, row.age_group, row.gender, row.people)
        for row in rows
    )


def counts_json(rows: Iterable[CountRow]) -> list[dict[str, Any]]:
    """`rows` as JSON-ready records: COUNT_FIELDS and start_unix."""
    return [
        {
            "camera": row.camera,
            "start_utc": utc_iso(row.start),
            "start_unix": int(row.start),
            "period": row.period,
            "age_group": row.age_group,
            "gender": row.gender,
            "people": row.people,
        }
        for row in rows
    ]
