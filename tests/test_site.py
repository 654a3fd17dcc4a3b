"""`agestream serve`'s site outputs for real: the visits store through kill -9 and a restart,
the webhook and MQTT events (a real mosquitto) against the store and each other, the MQTT
status and Home Assistant discovery topics, `agestream counts` and /api/counts against the
store, the hourly counts announced from a real store, and what `--store` writes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.config import DEFAULT_CONFIG_PATH, ConfigError, EventsConfig
from stream.events_out import home_assistant_discovery, hourly_counts, iso_utc
from stream.people_sinks import SAVE_EVERY_S
from stream.site_outputs import HourlyCounts, open_publishers
from stream.types import CountRow, Visit
from stream.visits import COUNT_FIELDS, VisitStore, counts_csv, counts_json, open_store
from tests.conftest import HAMILTON, free_port, require, wait_for
from tests.test_events_out import MOSQUITTO, Broker, Receiver, Subscriber
from tests.test_serve import S32, Server

Key = tuple[str, str, int]
Heard = tuple[str, str, str, int]  # (event, camera, run, person)
CAMERAS = (S32.stem, HAMILTON.stem)
PERSON_EVENTS = ("person_entered", "person_left")
STATUS_TOPIC = "agestream/status"
MQTT_TOPICS = {STATUS_TOPIC} | {
    f"agestream/{camera}/{name}" for camera in CAMERAS for name in (*PERSON_EVENTS, "counts/hourly")
}
RUN_S = 8.0
POLL_S = 0.5
# A kill loses at most the open visits' last save interval, plus a frame's way through the
# stages on two busy cores.
MAX_LOST_S = SAVE_EVERY_S + 2.0
# An event published this long before the kill reached both receivers (loopback, busy cores).
DELIVERED_WITHIN_S = 2.0
# How long a receiver may take to see what serve sent (a status, a retained config).
ARRIVES_WITHIN_S = 30.0


def key(visit: Visit) -> Key:
    return visit.camera, visit.run, visit.person


def event_key(event: dict[str, Any]) -> Key:
    return event["camera"], event["run"], event["person"]


def heard(events: list[dict[str, Any]]) -> set[Heard]:
    return {(e["event"], *event_key(e)) for e in events if e["event"] in PERSON_EVENTS}


def stored(database: Path) -> dict[Key, Visit]:
    """Every visit in the store, read on a connection of its own (WAL: beside the writer)."""
    with open_store(database, create=False) as store:
        return {key(v): v for v in store.visits(0.0, time.time() + 3600, limit=100_000)}


def camera_totals(rows: list[CountRow]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for row in rows:
        totals[row.camera] += row.people
    return totals


@dataclass
class Site:
    """A serve process with a visits store, a webhook receiver and an MQTT broker, started and
    ended by the test; `events` subscribes to agestream/#, `discovery` to homeassistant/#.
    `seen` holds every store poll: (time.time(), the visits then), and `heard` what each
    receiver had then: (time.time(), the webhook's, MQTT's)."""

    database: Path
    receiver: Receiver
    broker: Broker
    events: Subscriber
    discovery: Subscriber
    command: list[str]
    servers: list[Server] = field(default_factory=list)
    seen: list[tuple[float, dict[Key, Visit]]] = field(default_factory=list)
    heard: list[tuple[float, set[Heard], set[Heard]]] = field(default_factory=list)

    def start(self) -> Server:
        port = free_port()
        command = [*self.command, "--port", str(port)]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.servers.append(Server(process, port, self.database.parent, None))
        return self.servers[-1]

    def poll_until(self, server: Server, done: Any, timeout_s: float, what: str) -> None:
        """Poll the store every POLL_S until `done(visits)` holds; the server must keep running."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert server.process.poll() is None, server.process.communicate()[1]
            visits = stored(self.database) if self.database.exists() else {}
            self.seen.append((time.time(), visits))
            by_webhook, by_mqtt = heard(self.receiver.bodies()), heard(self.mqtt_events())
            self.heard.append((time.time(), by_webhook, by_mqtt))
            if done(visits):
                return
            assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
            time.sleep(POLL_S)

    def mqtt_events(self) -> list[dict[str, Any]]:
        """The person events received over MQTT, in order; each on its own camera's topic."""
        events = []
        for message in list(self.events.messages):
            assert message.topic in MQTT_TOPICS, f"a message on {message.topic}"
            if message.topic.endswith(PERSON_EVENTS):
                event = json.loads(message.payload)
                assert message.topic == f"agestream/{event['camera']}/{event['event']}", event
                events.append(event)
        return events

    def wait_statuses(self, expected: list[str]) -> None:
        """Wait for as many messages on the status topic as `expected`; they are those."""
        wait_for(
            lambda: len(self.events.payloads(STATUS_TOPIC)) >= len(expected),
            ARRIVES_WITHIN_S, f"status {expected[-1]} on {STATUS_TOPIC}",
        )  # fmt: skip
        assert self.events.payloads(STATUS_TOPIC) == expected


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    if not MOSQUITTO.exists():
        pytest.skip(f"needs mosquitto at {MOSQUITTO}: apt-get install mosquitto")
    videos = [str(require(S32)), str(require(HAMILTON))]
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["events"]["home_assistant"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with ExitStack() as stack:
        broker = Broker(tmp_path)
        broker.start()
        stack.callback(broker.stop)
        receiver = Receiver()
        stack.callback(receiver.stop)
        events = Subscriber(broker.port, "agestream/#")
        stack.callback(events.close)
        discovery = Subscriber(broker.port, "homeassistant/#")
        stack.callback(discovery.close)
        database = tmp_path / "visits.db"
        command = [sys.executable, "-m", "stream", "serve", *videos, "--loop"]
        command += ["--config", str(tmp_path / "config.yaml"), "--database", str(database)]
        command += ["--webhook", receiver.url, "--mqtt", broker.url]
        running = Site(database, receiver, broker, events, discovery, command)
        yield running
        for server in running.servers:
            end(server.process)


def end(process: subprocess.Popen) -> None:
    """Kill `process` if it still runs (a test that failed midway)."""
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=30)


def kill_and_check(site: Site, server: Server) -> tuple[dict[Key, Visit], float]:
    """SIGKILL `server`; check that the store opens and keeps every visit a poll saw, open ones
    included, and that the open visits lost at most MAX_LOST_S. The visits then and the kill's
    time.time()."""
    before = site.seen[-1][1]
    killed_at = time.time()
    server.process.kill()
    server.process.communicate(timeout=30)
    after = stored(site.database)
    for _, visits in site.seen:
        for visit_key, visit in visits.items():
            assert visit_key in after, f"visit {visit_key} lost by the kill"
            assert after[visit_key].last_seen >= visit.last_seen
            assert after[visit_key].ended or not visit.ended
    open_visits = [v for v in after.values() if not v.ended]
    assert open_visits, "the people in view at the kill are kept as open visits"
    lost = {
        camera: killed_at - max(v.last_seen for v in open_visits if v.camera == camera)
        for camera in {v.camera for v in open_visits}
    }
    print(
        f"kill -9: {len(before)} visits at the last poll, {len(after)} after the kill "
        f"({len(open_visits)} open); seconds lost per camera: "
        + ", ".join(f"{camera} {seconds:.1f}" for camera, seconds in sorted(lost.items()))
    )
    assert max(lost.values()) <= MAX_LOST_S, lost
    return after, killed_at


def check_api_counts(server: Server, database: Path, start: float, killed_at: float) -> None:
    """While `server` runs: /api/counts and /api/counts.csv of the killed incarnation's time
    equal the store's, and of up to now lie between the store's before and after the call."""
    with open_store(database, create=False) as store:
        fixed = store.counts(start, killed_at)
        status, answer = server.call("GET", f"/api/counts?from={start}&to={killed_at}")
        assert status == 200, answer
        assert answer["rows"] == counts_json(fixed)
        assert answer["totals"]["people"] == sum(camera_totals(fixed).values())
        text = io.StringIO()
        counts_csv(fixed, text)
        assert server.call("GET", f"/api/counts.csv?from={start}&to={killed_at}") == (
            200, text.getvalue()
        )  # fmt: skip
        end = time.time() + 3600
        low = camera_totals(store.counts(start, end))
        status, answer = server.call("GET", f"/api/counts?from={start}&to={end}")
        high = camera_totals(store.counts(start, end))
    live: Counter[str] = Counter()
    for row in answer["rows"]:
        live[row["camera"]] += row["people"]
    for camera in CAMERAS:
        assert low[camera] <= live[camera] <= high[camera], (camera, low, live, high)


def check_counts_command(database: Path, store: VisitStore) -> None:
    """`agestream counts DB --json -` and `--csv -` give the store's counts."""
    command = [sys.executable, "-m", "stream", "counts", str(database)]
    as_json = subprocess.run([*command, "--json", "-"], capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    expected = store.counts(time.time() - 3600, time.time())
    assert json.loads(as_json.stdout) == counts_json(expected)
    totals: Counter[str] = Counter()
    for row in json.loads(as_json.stdout):
        totals[row["camera"]] += row["people"]
    assert totals == camera_totals(expected) and set(totals) == set(CAMERAS)
    as_csv = subprocess.run([*command, "--csv", "-"], capture_output=True, text=True, timeout=60)
    assert as_csv.returncode == 0, as_csv.stderr
    header, *lines = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert tuple(header) == COUNT_FIELDS
    assert sum(int(line[-1]) for line in lines) == sum(totals.values())


def check_events(events: list[dict[str, Any]], visits: dict[Key, Visit], runs: set[str]) -> None:
    """Each person_left follows its person_entered and is the only one of its visit; every
    ended visit of `runs` (the incarnation stopped by SIGINT: every visit ended) has one, and
    no other visit of them; every person_left of another run is an ended visit of the store."""
    entered: set[Key] = set()
    left: Counter[Key] = Counter()
    for event in events:
        if event["event"] == "person_entered":
            entered.add(event_key(event))
        elif event["event"] == "person_left":
            assert event_key(event) in entered, f"person_left before person_entered: {event}"
            left[event_key(event)] += 1
            visit = visits[event_key(event)]
            assert visit.ended, f"person_left of {event_key(event)}, open in the store"
            assert (event["age_group"], event["gender"]) == (visit.age_group, visit.counted_gender)
    assert all(n == 1 for n in left.values()), f"person_left sent twice: {left.most_common(3)}"
    last = {k: v for k, v in visits.items() if v.run in runs}
    assert last and all(v.ended for v in last.values()), "SIGINT ends every visit"
    assert {k: n for k, n in left.items() if k[1] in runs} == dict.fromkeys(last, 1)


def test_given_kill_9_and_a_restart_then_visits_counts_and_events_agree(site: Site) -> None:
    started_at = time.time()
    first = site.start()
    first.wait_running(2)
    site.wait_statuses(["online"])
    site.poll_until(
        first, lambda v: {c for c, _, _ in v} == set(CAMERAS), 60, "visits of both cameras"
    )
    ready = time.monotonic()
    site.poll_until(first, lambda _: time.monotonic() - ready >= RUN_S, RUN_S + 5, "a run")
    before_kill, killed_at = kill_and_check(site, first)
    first_runs = {run for _, run, _ in before_kill}

    second = site.start()
    second.wait_running(2)
    restarted = time.monotonic()
    site.wait_statuses(["online", "offline", "online"])  # the killed one's Last Will between
    check_api_counts(second, site.database, started_at - 60, killed_at)
    time.sleep(max(0.0, RUN_S - (time.monotonic() - restarted)))
    stderr = second.stop()
    assert second.process.returncode == 0, stderr
    assert "undelivered" not in stderr, stderr
    site.wait_statuses(["online", "offline", "online", "offline"])
    check_retained(site.broker.port, STATUS_TOPIC, {STATUS_TOPIC: "offline"})

    final = stored(site.database)
    for visit_key, visit in before_kill.items():  # as they were, or ended by the restart
        kept = final[visit_key]
        assert kept == visit or (kept.ended and kept.first_seen == visit.first_seen), kept
    new_runs = {run for _, run, _ in final} - first_runs
    assert {camera for camera, run, _ in final if run in new_runs} == set(CAMERAS)
    assert len(new_runs) == len(CAMERAS), "one new run per camera"
    with open_store(site.database, create=False) as store:
        rows = store.counts(started_at - 60, time.time())
        assert camera_totals(rows) == Counter(camera for camera, _, _ in final)
        check_counts_command(site.database, store)
    check_events(site.receiver.bodies(), final, new_runs)
    check_events(site.mqtt_events(), final, new_runs)
    check_both_heard(site, new_runs, killed_at)
    # The people in view at the kill: the restart ended their visits and said they left, once.
    open_at_kill = {k for k, v in before_kill.items() if not v.ended}
    assert open_at_kill, "someone was in view at the kill"
    for events in (site.receiver.bodies(), site.mqtt_events()):
        left = Counter(event_key(e) for e in events if e["event"] == "person_left")
        assert {k: left[k] for k in open_at_kill} == dict.fromkeys(open_at_kill, 1)
    check_discovery(site, starts=2)
    print(
        f"restart: {len(final) - len(before_kill)} visits in runs {sorted(new_runs)}; "
        f"{len(final)} in all, {len(site.receiver.bodies())} events received"
    )


def check_both_heard(site: Site, runs: set[str], killed_at: float) -> None:
    """The webhook and MQTT heard the same person events of `runs` (stopped by SIGINT, which
    delivers every event). Of the killed incarnation, what either had heard DELIVERED_WITHIN_S
    before the kill reached both, as did the person_left of each visit the store had ended by
    then: only events sent around the kill may have reached one receiver alone."""
    by_webhook, by_mqtt = heard(site.receiver.bodies()), heard(site.mqtt_events())
    assert {h for h in by_webhook if h[2] in runs} == {h for h in by_mqtt if h[2] in runs}
    settled = killed_at - DELIVERED_WITHIN_S
    early = set().union(*(webhook | mqtt for t, webhook, mqtt in site.heard if t <= settled))
    early |= {
        ("person_left", *k) for t, visits in site.seen if t <= settled
        for k, visit in visits.items() if visit.ended
    }  # fmt: skip
    assert early <= by_webhook, f"missed by the webhook: {sorted(early - by_webhook)}"
    assert early <= by_mqtt, f"missed by MQTT: {sorted(early - by_mqtt)}"
    print(
        f"events: {len(by_webhook)} by webhook, {len(by_mqtt)} by MQTT; {len(early)} settled "
        f"before the kill; {len(by_webhook ^ by_mqtt)} sent around the kill heard by one only"
    )


def check_retained(port: int, topics: str, expected: dict[str, Any]) -> None:
    """A subscriber to `topics` that comes now gets exactly `expected`, all retained."""
    late = Subscriber(port, topics)
    try:
        wait_for(
            lambda: {m.topic for m in list(late.messages)} >= set(expected),
            ARRIVES_WITHIN_S, f"the retained {topics}",
        )  # fmt: skip
        got = {m.topic: late.payloads(m.topic)[0] for m in list(late.messages)}
        assert got == expected and len(late.messages) == len(expected), sorted(got)
        assert all(m.retain for m in late.messages)
    finally:
        late.close()


def check_discovery(site: Site, starts: int) -> None:
    """Each serve start announced every served camera's Home Assistant discovery configs,
    and the broker keeps them retained."""
    expected = {
        topic: config
        for camera in CAMERAS
        for topic, config in home_assistant_discovery("agestream", camera)
    }
    people_hour = {f"homeassistant/sensor/agestream_{c}_people_hour/config" for c in CAMERAS}
    assert people_hour <= set(expected), "each camera's people-this-hour sensor"

    def announced() -> Counter[str]:
        return Counter(m.topic for m in list(site.discovery.messages))

    wait_for(
        lambda: set(announced()) >= set(expected) and min(announced().values()) >= starts,
        ARRIVES_WITHIN_S, f"the discovery configs announced by {starts} starts",
    )  # fmt: skip
    assert set(announced()) == set(expected), sorted(set(announced()) ^ set(expected))
    check_retained(site.broker.port, "homeassistant/#", expected)


# ---- hourly counts ---------------------------------------------------------------------


HOUR = 1_746_108_000.0  # 2025-05-01T14:00:00Z


def visit(camera: str, person: int, first_seen: float, **person_fields: Any) -> Visit:
    fields: dict[str, Any] = dict(age=None, age_low=None, age_high=None, gender=None)
    fields |= dict(confidence=None) | person_fields
    return Visit(camera, "20250501T130000Z-1", person, first_seen, first_seen + 30, ended=True,
                 **fields)  # fmt: skip


class Recording:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_hourly_counts_are_announced_from_the_store_per_camera(tmp_path: Path) -> None:
    adult = dict(age=31.0, age_low=26.0, age_high=37.0, gender="female", confidence=0.9)
    child = dict(age=7.0, age_low=5.0, age_high=9.0, gender="male", confidence=0.8)
    known = [
        visit("door", 1, HOUR + 1, **adult), visit("door", 2, HOUR + 1800, **adult),
        visit("door", 3, HOUR + 3599, **child), visit("door", 4, HOUR + 3000),
        visit("door", 5, HOUR - 1, **adult), visit("door", 6, HOUR + 3600, **child),
        visit("hall", 1, HOUR + 3600, **adult),
    ]  # fmt: skip
    publisher = Recording()
    with open_store(tmp_path / "visits.db") as store:
        store.save(known)
        announcer = HourlyCounts(store, [publisher], lambda: ["door", "hall"], threading.Event())
        announcer.announce(HOUR)
        rows = store.counts(HOUR, HOUR + 3600)
    door, hall = publisher.events
    assert door == hourly_counts("door", rows, hour_start=HOUR)
    assert (door["camera"], door["hour"], door["people"]) == ("door", iso_utc(HOUR), 4)
    assert door["people"] == sum(camera_totals(rows).values())
    assert door["age_groups"] == {
        "0-9": 1, "10-19": 0, "20-39": 2, "40-59": 0, "60+": 0, "unknown": 1,
    }  # fmt: skip
    assert door["genders"] == {"male": 1, "female": 2, "unsure": 0, "unknown": 1}
    assert (hall["camera"], hall["hour"], hall["people"]) == ("hall", iso_utc(HOUR), 0)
    assert set(hall["age_groups"].values()) == set(hall["genders"].values()) == {0}


def test_hourly_counts_of_a_closed_store_are_logged_not_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = Recording()
    store = open_store(tmp_path / "visits.db")
    store.close()
    stop = threading.Event()
    announcer = HourlyCounts(store, [publisher], lambda: ["door"], stop)
    announcer.announce(HOUR)
    assert publisher.events == [] and "cannot read the hour's counts" in caplog.text
    announcer.start()
    stop.set()
    announcer.join(timeout=5)
    assert not announcer.is_alive(), "the announcer ends when its stop is set"


def test_open_publishers_refuses_a_bad_url_on_one_line() -> None:
    with ExitStack() as stack, pytest.raises(ConfigError, match="must look like http") as caught:
        open_publishers(EventsConfig(webhooks=("ftp://host/x",)), stack)
    assert "\n" not in str(caught.value)


# ---- what --store writes -----------------------------------------------------------------


def test_given_store_video_without_an_output_dir_then_serve_refuses_on_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "serve", str(require(S32)), "--store", "video"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--output-dir" in lines[0], done.stderr


def test_given_the_default_store_then_serve_writes_only_the_visits_store(tmp_path: Path) -> None:
    output_dir, port = tmp_path / "out", free_port()
    command = [sys.executable, "-m", "stream", "serve", str(require(S32)), "--loop"]
    command += ["--port", str(port), "--output-dir", str(output_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = Server(process, port, output_dir, None)
    database = output_dir / "visits.db"
    try:
        server.wait_running(1)
        deadline = time.monotonic() + 30
        while not (database.exists() and stored(database)):
            assert time.monotonic() < deadline, "no visit saved in 30 s"
            time.sleep(POLL_S)
        stderr = server.stop()
    finally:
        end(process)
    assert process.returncode == 0, stderr
    assert f"keeping visits and counts in {database}; no image or video" in stderr
    written = {p.name for p in output_dir.rglob("*") if p.is_file()}
    assert "visits.db" in written
    assert written <= {"visits.db", "visits.db-wal", "visits.db-shm"}, written
    assert all(v.ended for v in stored(database).values())
