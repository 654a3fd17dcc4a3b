"""The visits store (stream/visits.py) on SQLite and on a PostgreSQL server started for these
tests: saving, counting, durability through kill -9, threads, bad targets; and the `counts`
command that reads it (stream/counts_command.py)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os
import pwd
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from stream.counts_command import add_counts_parser, cmd_counts, parse_when
from stream.types import UNKNOWN, CountRow, Visit
from stream.visits import (
    StoreError,
    VisitStore,
    counts_csv,
    counts_json,
    open_store,
    redacted,
)
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 12, 3, 14, tzinfo=UTC).timestamp()  # the start of a UTC hour
HOUR = 3600.0
DAY = 24 * HOUR


def visit(
    person: int,
    first_seen: float,
    camera: str = "cam1",
    age: float | None = 30.0,
    gender: str | None = "male",
    ended: bool = True,
    last_seen: float | None = None,
    run: str = "run1",
) -> Visit:
    return Visit(
        camera=camera, run=run, person=person, first_seen=first_seen,
        last_seen=first_seen + 5.0 if last_seen is None else last_seen,
        age=age, age_low=None if age is None else age - 3,
        age_high=None if age is None else age + 3,
        gender=gender, confidence=None if gender in (None, "unsure") else 0.9, ended=ended,
    )  # fmt: skip


def summary(rows: list[CountRow]) -> list[tuple[str, str, str, str, int]]:
    """Rows as (camera, ISO start, age group, gender, people)."""
    iso = (datetime.fromtimestamp(row.start, UTC).isoformat() for row in rows)
    return [(r.camera, s, r.age_group, r.gender, r.people) for r, s in zip(rows, iso, strict=True)]


# --- a PostgreSQL server of the tests' own ---------------------------------------------------


def postgres_program(name: str) -> Path | None:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3])
    )
    return versions[-1] if versions else None


def server_user() -> str | None:
    """Whom to run the server as: ourselves, unless we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root, with no postgres or nobody user to run PostgreSQL as")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The base URL (no database) of a throwaway PostgreSQL server on a free loopback port,
    its data in a fresh folder; stopped through its own process at the end."""
    initdb = postgres_program("initdb")
    if initdb is None:
        pytest.skip("needs PostgreSQL's initdb and postgres: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="needs psycopg: pip install -e '.[postgres]'")
    user = server_user()
    # Not pytest's tmp_path: its root folder is closed to the server's user.
    folder = Path(tempfile.mkdtemp(prefix="agestream-pg-"))
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(folder, account.pw_uid, account.pw_gid)
    data = folder / "data"
    subprocess.run(
        [str(initdb), "-D", str(data), "-U", "agestream", "--auth=trust", "-E", "UTF8"]
        + ["--locale=C", "--no-sync", "--no-instructions"],
        user=user, cwd=folder, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(initdb.parent / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port)]
            + ["-k", str(folder), "-c", "fsync=off", "-c", "full_page_writes=off"],
            user=user, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"postgresql://agestream@127.0.0.1:{port}"
    try:
        wait_for_postgres(url, server, log_path)
        yield url
    finally:
        server.terminate()  # smart shutdown: our connections are closed by now
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def wait_for_postgres(url: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(f"{url}/postgres", connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)


_database_numbers = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """The URL of a new, empty database on the tests' server."""
    import psycopg

    name = f"visits_{next(_database_numbers)}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new store's target: an SQLite file path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "store" / "visits.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_target: str) -> Iterator[VisitStore]:
    with open_store(store_target) as opened:
        yield opened


# --- saving and counting, on both databases --------------------------------------------------


def test_given_an_open_visit_saved_three_times_then_ended_then_it_counts_once(
    store: VisitStore,
) -> None:
    for last_seen in (T0 + 3, T0 + 6, T0 + 9):
        store.save([visit(1, T0 + 1, ended=False, last_seen=last_seen)])
    store.save([visit(1, T0 + 1, ended=True, last_seen=T0 + 12)])
    assert summary(store.counts(T0, T0 + HOUR)) == [
        ("cam1", "2026-12-03T14:00:00+00:00", "20-39", "male", 1)
    ]
    (saved,) = store.visits(T0, T0 + HOUR)
    assert (saved.ended, saved.last_seen) == (True, T0 + 12)


def test_given_an_ended_visit_when_a_late_open_save_comes_then_it_stays_ended(
    store: VisitStore,
) -> None:
    store.save([visit(1, T0, ended=True, last_seen=T0 + 20, age=45.0)])
    store.save([visit(1, T0, ended=False, last_seen=T0 + 10, age=30.0)])
    (saved,) = store.visits(T0, T0 + HOUR)
    assert (saved.ended, saved.last_seen, saved.age) == (True, T0 + 20, 45.0)
    assert [row.age_group for row in store.counts(T0, T0 + HOUR)] == ["40-59"]


def test_given_a_camera_restarted_then_visits_its_killed_run_left_open_end_there(
    store: VisitStore,
) -> None:
    store.save([
        visit(1, T0, ended=False, last_seen=T0 + 8, run="killed"),
        visit(2, T0, ended=False, last_seen=T0 + 9, camera="cam2", run="other"),
        visit(1, T0 + 60, ended=False, last_seen=T0 + 61, run="now"),
    ])  # fmt: skip
    (ended,) = store.end_earlier("cam1", "now")
    assert (ended.run, ended.person, ended.ended, ended.last_seen) == ("killed", 1, True, T0 + 8)
    assert store.end_earlier("cam1", "now") == [], "ended once"
    saved = {(v.camera, v.run): v for v in store.visits(T0, T0 + HOUR)}
    assert (saved["cam1", "killed"].ended, saved["cam1", "killed"].last_seen) == (True, T0 + 8)
    assert not saved["cam1", "now"].ended and not saved["cam2", "other"].ended
    assert sum(row.people for row in store.counts(T0, T0 + HOUR)) == 3


def test_given_visits_either_side_of_utc_hours_then_each_counts_in_its_own_hour(
    store: VisitStore,
) -> None:
    store.save(
        [visit(1, T0 - 0.001), visit(2, T0), visit(3, T0 + HOUR - 0.001), visit(4, T0 + HOUR)]
    )
    assert summary(store.counts(T0 - HOUR, T0 + 2 * HOUR)) == [
        ("cam1", "2026-12-03T13:00:00+00:00", "20-39", "male", 1),
        ("cam1", "2026-12-03T14:00:00+00:00", "20-39", "male", 2),
        ("cam1", "2026-12-03T15:00:00+00:00", "20-39", "male", 1),
    ]


def test_given_a_window_then_its_start_counts_and_its_end_does_not(store: VisitStore) -> None:
    store.save([visit(1, T0 + 10), visit(2, T0 + 20), visit(3, T0 + 30)])
    assert sum(row.people for row in store.counts(T0 + 10, T0 + 30)) == 2
    assert [v.person for v in store.visits(T0 + 10, T0 + 30)] == [1, 2]


def test_given_a_camera_then_only_its_people_count(store: VisitStore) -> None:
    store.save([visit(1, T0, camera="door"), visit(2, T0, camera="hall"), visit(3, T0 + 60)])
    assert summary(store.counts(T0, T0 + HOUR, camera="hall")) == [
        ("hall", "2026-12-03T14:00:00+00:00", "20-39", "male", 1)
    ]
    assert [row.camera for row in store.counts(T0, T0 + HOUR)] == ["cam1", "door", "hall"]
    assert store.cameras() == ["cam1", "door", "hall"]
    assert store.counts(T0, T0 + HOUR, camera="nowhere") == []


def test_given_by_day_then_people_count_in_their_utc_day(store: VisitStore) -> None:
    midnight = datetime(2026, 12, 4, tzinfo=UTC).timestamp()
    store.save(
        [visit(1, T0), visit(2, midnight - 0.5), visit(3, midnight), visit(4, T0 - 14 * HOUR)]
    )
    rows = store.counts(T0 - DAY, T0 + DAY, by="day")
    assert summary(rows) == [
        ("cam1", "2026-12-03T00:00:00+00:00", "20-39", "male", 3),
        ("cam1", "2026-12-04T00:00:00+00:00", "20-39", "male", 1),
    ]
    assert {row.period for row in rows} == {"day"}


def test_given_no_age_or_gender_then_people_count_as_unknown_sorted_last(
    store: VisitStore,
) -> None:
    store.save(
        [
            visit(1, T0, age=None, gender=None),
            visit(2, T0, age=70.0, gender="female"),
            visit(3, T0, age=5.0, gender="unsure"),
            visit(4, T0, age=5.0, gender="male"),
            visit(5, T0, age=None, gender="female"),
            visit(6, T0, age=float("nan"), gender="female"),
        ]
    )
    assert [(r.age_group, r.gender, r.people) for r in store.counts(T0, T0 + HOUR)] == [
        ("0-9", "male", 1),
        ("0-9", "unsure", 1),
        ("60+", "female", 1),
        (UNKNOWN, "female", 2),
        (UNKNOWN, UNKNOWN, 1),
    ]


def test_given_numpy_numbers_then_visits_read_back_as_saved(store: VisitStore) -> None:
    saved = visit(7, T0 + 1.25, age=33.5, ended=False)
    # What a tracker's arrays hand out; the store saves them as plain numbers.
    with_numpy = dataclasses.replace(
        saved,
        person=np.int64(7),  # type: ignore[arg-type]
        first_seen=np.float64(T0 + 1.25),
        age=np.float32(33.5),  # type: ignore[arg-type]
    )
    store.save([with_numpy])
    assert store.visits(T0, T0 + HOUR) == [saved]
    assert store.visits(T0, T0 + HOUR, camera="other") == []


def test_given_a_store_closed_and_opened_again_then_its_visits_remain(store_target: str) -> None:
    with open_store(store_target) as first:
        first.save([visit(1, T0), visit(2, T0 + 5, ended=False)])
    with open_store(store_target, create=False) as again:
        assert [v.person for v in again.visits(T0, T0 + HOUR)] == [1, 2]
        assert sum(row.people for row in again.counts(T0, T0 + HOUR)) == 2


def test_given_bad_period_or_window_then_value_error_names_it(store: VisitStore) -> None:
    with pytest.raises(ValueError, match="Invalid by 'week', expecting one of: hour, day"):
        store.counts(T0, T0 + HOUR, by="week")
    with pytest.raises(ValueError, match="start < end"):
        store.counts(T0, T0)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        store.visits(T0, T0 + HOUR, limit=0)


def test_given_threads_saving_and_reading_at_once_then_everyone_counts_once(
    store: VisitStore, store_target: str
) -> None:
    failures: list[BaseException] = []
    done = threading.Event()

    def camera_thread(camera: str) -> None:
        try:
            for person in range(30):
                first_seen = T0 + person
                store.save([visit(person, first_seen, camera=camera, ended=False)])
                store.save([visit(person, first_seen, camera=camera, ended=True)])
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)

    def reader(reading: VisitStore) -> None:
        try:
            while not done.is_set():
                total = sum(row.people for row in reading.counts(T0, T0 + HOUR))
                assert total <= 6 * 30
                reading.visits(T0, T0 + HOUR, limit=10)
        except BaseException as error:  # noqa: BLE001
            failures.append(error)

    with open_store(store_target, create=False) as other:  # as `agestream counts` would
        readers = [threading.Thread(target=reader, args=(s,)) for s in (store, other)]
        writers = [threading.Thread(target=camera_thread, args=(f"cam{n}",)) for n in range(6)]
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join(timeout=60)
        done.set()
        for thread in readers:
            thread.join(timeout=60)
    assert not failures, failures
    rows = store.counts(T0, T0 + HOUR)
    assert [row.people for row in rows] == [30] * 6


# --- SQLite and PostgreSQL agree -------------------------------------------------------------


def random_visits(count: int, seed: int) -> list[Visit]:
    chance = random.Random(seed)
    visits = []
    for person in range(count):
        first_seen = T0 + chance.uniform(-3 * DAY, 3 * DAY)
        visits.append(
            visit(
                person,
                first_seen,
                camera=chance.choice(["door", "hall", "till"]),
                age=chance.choice([None, chance.uniform(0, 95)]),
                gender=chance.choice([None, "male", "female", "unsure"]),
                ended=chance.random() < 0.8,
                run=chance.choice(["runA", "runB"]),
            )
        )
    return visits


def expected_counts(visits: list[Visit], start: float, end: float, period: float) -> Counter:
    return Counter(
        (v.camera, (v.first_seen // period) * period, v.age_group, v.counted_gender)
        for v in visits
        if start <= v.first_seen < end
    )


def test_given_the_same_visits_then_sqlite_and_postgres_count_the_same(
    tmp_path: Path, postgres_url: str
) -> None:
    visits = random_visits(600, seed=3)
    stores = [open_store(tmp_path / "visits.db"), open_store(postgres_url)]
    try:
        for store in stores:
            for first in range(0, len(visits), 50):
                store.save(visits[first : first + 50])
        start, end = T0 - 2 * DAY + 1234.5, T0 + 2 * DAY
        for by, period in (("hour", HOUR), ("day", DAY)):
            for camera in (None, "hall"):
                on_sqlite, on_postgres = (s.counts(start, end, camera, by) for s in stores)
                assert on_sqlite == on_postgres
                wanted = expected_counts(
                    [v for v in visits if camera in (None, v.camera)], start, end, period
                )
                got = Counter(
                    {(r.camera, r.start, r.age_group, r.gender): r.people for r in on_sqlite}
                )
                assert got == wanted
        assert stores[0].visits(start, end, limit=50) == stores[1].visits(start, end, limit=50)
    finally:
        for store in stores:
            store.close()


def test_given_the_server_drops_the_connection_then_the_next_save_connects_again(
    postgres_url: str,
) -> None:
    import psycopg

    with open_store(postgres_url) as store:
        store.save([visit(1, T0)])
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'agestream visits' AND datname = current_database()"
            )
        store.save([visit(2, T0 + 1)])
        assert [v.person for v in store.visits(T0, T0 + HOUR)] == [1, 2]


# --- SQLite on disk: durability, schema, bad targets -----------------------------------------

WRITER = """
import sys, time
from stream.types import Visit
from stream.visits import open_store

store = open_store(sys.argv[1])
start = time.time()
for number in range(1, 10**9):
    now = time.time()
    store.save([
        Visit("door", "run1", 0, start, now, 30.0, 27.0, 33.0, "male", 0.9, False),
        Visit("door", "run1", number, now, now, 40.0, None, None, "female", 0.8, True),
    ])
    print(number, flush=True)
"""


def read_confirmed_saves(writer: subprocess.Popen[bytes], wanted: int, timeout_s: float) -> bytes:
    """The writer's output until it has confirmed `wanted` saves."""
    assert writer.stdout is not None and writer.stderr is not None
    output = b""
    deadline = time.monotonic() + timeout_s
    while len(output.splitlines()) <= wanted:
        ready, _, _ = select.select([writer.stdout], [], [], deadline - time.monotonic())
        assert ready, f"the writer confirmed {len(output.splitlines())} saves in {timeout_s} s"
        chunk = os.read(writer.stdout.fileno(), 65536)
        assert chunk, f"the writer ended: {writer.stderr.read().decode()}"
        output += chunk
    return output


def test_given_a_writer_killed_with_sigkill_then_every_confirmed_save_is_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "visits.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        output = read_confirmed_saves(writer, wanted=200, timeout_s=30)
        writer.send_signal(signal.SIGKILL)
        output += writer.communicate(timeout=10)[0]
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL
    confirmed = int(output.splitlines()[-1] if output.endswith(b"\n") else output.splitlines()[-2])
    with closing_sqlite(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with open_store(path, create=False) as store:
        visits = store.visits(0, time.time() + 1, limit=10**6)
    people = sorted(v.person for v in visits)
    # Every confirmed save is there; at most one more committed before its print.
    assert people[: confirmed + 1] == list(range(confirmed + 1))
    assert len(people) - 1 in (confirmed, confirmed + 1)
    # The open visit and the newest ended one were written by the same transaction.
    open_visit = next(v for v in visits if v.person == 0)
    assert not open_visit.ended
    assert open_visit.last_seen == max(v.first_seen for v in visits if v.person)


def closing_sqlite(path: Path) -> closing[sqlite3.Connection]:
    """A plain sqlite3 connection, closed by its `with` block (sqlite3's own only commits)."""
    return closing(sqlite3.connect(path, timeout=10))


def test_given_a_store_of_a_newer_schema_then_opening_refuses_it(tmp_path: Path) -> None:
    path = tmp_path / "visits.db"
    open_store(path).close()
    with closing_sqlite(path) as raw:
        raw.execute("UPDATE agestream_schema SET version = 99 WHERE name = 'visits'")
        raw.commit()
    with pytest.raises(StoreError, match=r"schema version 99, this agestream knows version 1"):
        open_store(path)


def test_given_a_missing_file_and_no_create_then_nothing_is_made(tmp_path: Path) -> None:
    path = tmp_path / "none" / "visits.db"
    with pytest.raises(StoreError, match=f"^no visits store at {path}: check the path"):
        open_store(path, create=False)
    assert not path.parent.exists()


def test_given_an_sqlite_file_without_visits_and_no_create_then_it_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "other.db"
    with closing_sqlite(path) as raw:
        raw.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreError, match="holds no agestream visits tables"):
        open_store(path, create=False)


def bad_target(kind: str, folder: Path) -> str | Path:
    """A store target of one bad `kind`, made in `folder`."""
    if kind == "folder":
        return folder
    if kind == "not-a-database":
        (folder / "notes.txt").write_text("not a database\n" * 100)
        return folder / "notes.txt"
    if kind == "parent-is-a-file":
        (folder / "file").write_text("")
        return folder / "file" / "visits.db"
    return "mysql://user:secret@db.example/visits"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("folder", r"^visits store .+ is a folder: give a file path, such as .+visits\.db$"),
        (
            "not-a-database",
            r"^visits store .+notes\.txt is not an SQLite database \(file is not a database\)",
        ),
        (
            "parent-is-a-file",
            r"^cannot open visits store .+file/visits\.db: .+: check the path and its permissions$",
        ),
        ("unknown-url", r"^visits store mysql://user:\*\*\*@db\.example/visits: unknown kind"),
    ],
)
def test_given_a_bad_target_then_store_error_is_one_line_naming_it(
    tmp_path: Path, kind: str, message: str
) -> None:
    with pytest.raises(StoreError, match=message) as error:
        open_store(bad_target(kind, tmp_path))
    assert "\n" not in str(error.value)
    assert "secret" not in str(error.value)


def test_given_an_unreachable_server_then_store_error_names_it_without_password() -> None:
    pytest.importorskip("psycopg", reason="needs psycopg: pip install -e '.[postgres]'")
    url = f"postgresql://counter:secret@127.0.0.1:{free_port()}/visits?password=secret"
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        open_store(url)
    message = str(error.value)
    assert message.startswith(
        "cannot connect to visits store postgresql://counter:***@127.0.0.1:"
    ), message
    assert "secret" not in message and "\n" not in message
    assert message.endswith(
        "check that the server runs and the URL's host, port, user and database"
    )
    assert time.monotonic() - started < 15


def test_given_psycopg_missing_then_a_postgres_url_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    with pytest.raises(StoreError, match=r"pip install 'agestream\[postgres\]'$"):
        open_store("postgres://user@127.0.0.1/visits")


def test_redacted_hides_passwords_and_keeps_the_rest() -> None:
    assert redacted("postgresql://u:p%40ss@db:5432/visits?sslmode=require&password=x") == (
        "postgresql://u:***@db:5432/visits?sslmode=require&password=***"
    )
    assert redacted("postgresql://u@db/visits") == "postgresql://u@db/visits"
    assert redacted(Path("/var/lib/agestream/visits.db")) == "/var/lib/agestream/visits.db"


# --- CSV and JSON ------------------------------------------------------------------------------

ROWS = [
    CountRow("door", T0, "hour", "20-39", "female", 4),
    CountRow("door", T0 + HOUR, "hour", UNKNOWN, UNKNOWN, 1),
]


def test_counts_csv_has_a_header_and_utc_iso_starts() -> None:
    text = io.StringIO()
    counts_csv(ROWS, text)
    assert text.getvalue() == (
        "camera,start_utc,period,age_group,gender,people\n"
        "door,2026-12-03T14:00:00Z,hour,20-39,female,4\n"
        "door,2026-12-03T15:00:00Z,hour,unknown,unknown,1\n"
    )


def test_counts_json_has_iso_and_unix_starts() -> None:
    assert counts_json(ROWS[:1]) == [
        {
            "camera": "door", "start_utc": "2026-12-03T14:00:00Z", "start_unix": int(T0),
            "period": "hour", "age_group": "20-39", "gender": "female", "people": 4,
        }
    ]  # fmt: skip


# --- the counts command ------------------------------------------------------------------------

COMMAND = """
import argparse, sys
from stream.counts_command import add_counts_parser, cmd_counts

parser = argparse.ArgumentParser(prog="agestream")
add_counts_parser(parser.add_subparsers(dest="command", required=True))
sys.exit(cmd_counts(parser.parse_args(sys.argv[1:])))
"""
WINDOW = ["--from", "2026-12-03", "--to", "2026-12-04"]


def counts(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="agestream")
    add_counts_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_counts(parser.parse_args(["counts", *argv]))


@pytest.fixture
def filled_target(store_target: str) -> str:
    with open_store(store_target) as store:
        store.save(
            [
                visit(1, T0 + 60, camera="door", age=5.0, gender="female"),
                visit(2, T0 + 120, camera="door", age=None, gender=None, ended=False),
                visit(3, T0 + HOUR, camera="door", age=70.0, gender="unsure"),
                visit(4, T0 + 30, camera="hall", age=30.0, gender="male"),
                visit(5, T0 - DAY, camera="hall"),  # the day before: outside the window
            ]
        )
    return store_target


def test_given_counts_without_outputs_then_it_prints_a_table(filled_target: str, capsys) -> None:
    assert counts([filled_target, *WINDOW]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "people first seen from 2026-12-03 00:00:00 UTC to 2026-12-04 00:00:00 UTC, all cameras, "
        "by hour ("
    )
    assert "password" not in lines[0]
    assert lines[1].split() == ["|", "age", "|", "gender"]
    assert lines[2].split() == [
        "camera", "hour", "(UTC)", "total", "|", "0-9", "10-19", "20-39", "40-59", "60+",
        "unknown", "|", "male", "female", "unsure", "unknown",
    ]  # fmt: skip
    table = [line.replace("|", "").split() for line in lines[3:]]
    assert table == [
        ["door", "2026-12-03", "14:00", "2", "1", "0", "0", "0", "0", "1", "0", "1", "0", "1"],
        ["door", "2026-12-03", "15:00", "1", "0", "0", "0", "0", "1", "0", "0", "0", "1", "0"],
        ["door", "all", "3", "1", "0", "0", "0", "1", "1", "0", "1", "1", "1"],
        ["hall", "2026-12-03", "14:00", "1", "0", "0", "1", "0", "0", "0", "1", "0", "0", "0"],
    ]


def test_given_csv_and_json_to_stdout_then_they_hold_the_rows(filled_target: str, capsys) -> None:
    assert counts([filled_target, *WINDOW, "--camera", "hall", "--csv", "-"]) == 0
    assert capsys.readouterr().out == (
        "camera,start_utc,period,age_group,gender,people\n"
        "hall,2026-12-03T14:00:00Z,hour,20-39,male,1\n"
    )
    assert counts([filled_target, *WINDOW, "--by", "day", "--json", "-"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["camera"], r["start_utc"], r["people"]) for r in records] == [
        ("door", "2026-12-03T00:00:00Z", 1),
        ("door", "2026-12-03T00:00:00Z", 1),
        ("door", "2026-12-03T00:00:00Z", 1),
        ("hall", "2026-12-03T00:00:00Z", 1),
    ]


def test_given_csv_and_json_files_then_they_are_written_whole(
    filled_target: str, tmp_path: Path, capsys
) -> None:
    csv_path, json_path = tmp_path / "counts.csv", tmp_path / "counts.json"
    csv_path.write_text("an older export\n")
    assert counts([filled_target, *WINDOW, "--csv", str(csv_path), "--json", str(json_path)]) == 0
    assert csv_path.read_text().splitlines()[0] == "camera,start_utc,period,age_group,gender,people"
    assert len(csv_path.read_text().splitlines()) == 1 + 4
    assert len(json.loads(json_path.read_text())) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("counts")) == [
        "counts.csv",
        "counts.json",
    ]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"agestream counts: wrote 4 rows to {csv_path}" in captured.err


def test_given_a_time_ago_then_counts_start_then(tmp_path: Path, capsys) -> None:
    now = time.time()
    with open_store(tmp_path / "visits.db") as store:
        store.save([visit(1, now - 3 * DAY), visit(2, now - 10 * DAY)])
    assert counts([str(tmp_path / "visits.db"), "--from", "7d", "--by", "day", "--csv", "-"]) == 0
    assert capsys.readouterr().out.count("\n") == 1 + 1
    assert counts([str(tmp_path / "visits.db")]) == 0  # the last 24 h: nobody
    assert "nobody was first seen by any camera in that time (cameras in the store: cam1)" in (
        capsys.readouterr().out
    )


def test_given_a_missing_store_then_counts_exits_2_without_making_it(
    tmp_path: Path, capsys
) -> None:
    path = tmp_path / "nowhere" / "visits.db"
    assert counts([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"agestream counts: no visits store at {path}: check the path (agestream serve makes it)\n"
    )
    assert not path.parent.exists()


def test_given_bad_times_then_counts_says_what_it_expects(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        counts([str(tmp_path / "visits.db"), "--from", "last tuesday"])
    assert exit_.value.code == 2
    assert "expected an ISO date or time" in capsys.readouterr().err
    open_store(tmp_path / "visits.db").close()
    assert counts([str(tmp_path / "visits.db"), "--from", "2026-12-04", "--to", "2026-12-03"]) == 2
    assert "--from (2026-12-04 00:00:00 UTC) must be before --to" in capsys.readouterr().err


def test_parse_when_reads_iso_times_as_utc_and_times_ago() -> None:
    assert parse_when("2026-12-03T14:00") == T0
    assert parse_when("2026-12-03 14:00") == T0
    assert parse_when("2026-12-03T15:00+01:00") == T0
    assert parse_when("2026-12-03T14:00:00Z") == T0
    assert parse_when("2026-12-03") == T0 - 14 * HOUR
    assert parse_when("24h", now=T0) == T0 - DAY
    assert parse_when("90m", now=T0) == T0 - 90 * 60
    assert parse_when("2w", now=T0) == T0 - 14 * DAY
    with pytest.raises(argparse.ArgumentTypeError, match="got '7 days'"):
        parse_when("7 days")


def test_given_stdout_closed_early_then_counts_ends_quietly(tmp_path: Path) -> None:
    path = tmp_path / "visits.db"
    with open_store(path) as store:  # 1500 hours: a table far longer than a pipe holds
        store.save([visit(n, T0 + n * HOUR) for n in range(1500)])
    command = subprocess.Popen(
        [sys.executable, "-c", COMMAND, "counts", str(path)]
        + ["--from", "2026-12-01", "--to", "2027-12-01"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert command.stdout is not None
    try:
        ready, _, _ = select.select([command.stdout], [], [], 30)
        assert ready and command.stdout.readline().startswith(b"people first seen")
        command.stdout.close()  # as `| head -1` does
        stderr = command.communicate(timeout=30)[1]
    finally:
        command.kill()
        command.wait(timeout=10)
    assert (command.returncode, stderr) == (141, b"")
