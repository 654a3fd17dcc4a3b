"""Events out: the payload builders, and the MQTT and webhook publishers against real
receivers on loopback (Debian's mosquitto, an http.server), including receivers that are down."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from stream.config import package_version
from stream.events_out import (
    MqttPublisher,
    WebhookPublisher,
    home_assistant_discovery,
    hourly_counts,
    parse_mqtt_url,
    person_entered,
    person_left,
)
from stream.sources import ReconnectPolicy
from stream.types import CountRow, Visit
from tests.conftest import free_port, wait_for

MOSQUITTO = Path("/usr/sbin/mosquitto")
QUICK = ReconnectPolicy(initial_s=0.05, max_s=0.2)
HOUR = 1_746_108_000.0  # 2025-05-01T14:00:00Z


def visit(**changes: Any) -> Visit:
    fields: dict[str, Any] = dict(
        camera="door", run="20250501T140000Z-1", person=7, first_seen=HOUR + 5.25,
        last_seen=HOUR + 47.5, age=31.46, age_low=26.04, age_high=37.96, gender="female",
        confidence=0.91234, ended=True,
    )  # fmt: skip
    return Visit(**(fields | changes))


# ---- payloads ----------------------------------------------------------------------------


def test_person_entered_has_the_documented_fields() -> None:
    assert person_entered(visit()) == {
        "event": "person_entered", "schema": 1, "camera": "door", "run": "20250501T140000Z-1",
        "person": 7, "time": "2025-05-01T14:00:05.250Z", "first_seen": "2025-05-01T14:00:05.250Z",
        "age": 31.5, "age_low": 26.0, "age_high": 38.0, "age_group": "20-39", "gender": "female",
        "confidence": 0.912, "agestream": package_version(),
    }  # fmt: skip


def test_person_left_of_an_unknown_age_and_gender() -> None:
    event = person_left(visit(age=None, age_low=None, age_high=None, gender=None, confidence=None))
    assert event == {
        "event": "person_left", "schema": 1, "camera": "door", "run": "20250501T140000Z-1",
        "person": 7, "time": "2025-05-01T14:00:47.500Z", "first_seen": "2025-05-01T14:00:05.250Z",
        "last_seen": "2025-05-01T14:00:47.500Z", "seconds_in_view": 42.2, "age": None,
        "age_low": None, "age_high": None, "age_group": "unknown", "gender": "unknown",
        "confidence": None, "agestream": package_version(),
    }  # fmt: skip
    assert person_left(visit(age=float("nan")))["age_group"] == "unknown"


def test_hourly_counts_sums_groups_and_genders() -> None:
    rows = [
        CountRow("door", HOUR, "hour", "20-39", "female", 3),
        CountRow("door", HOUR, "hour", "20-39", "male", 2),
        CountRow("door", HOUR, "hour", "60+", "unsure", 1),
        CountRow("door", HOUR, "hour", "unknown", "unknown", 4),
    ]
    event = hourly_counts("door", rows)
    assert event["hour"] == "2025-05-01T14:00:00.000Z"
    assert (event["event"], event["schema"], event["camera"], event["people"]) == (
        "hourly_counts", 1, "door", 10,
    )  # fmt: skip
    assert event["age_groups"] == {
        "0-9": 0, "10-19": 0, "20-39": 5, "40-59": 0, "60+": 1, "unknown": 4,
    }  # fmt: skip
    assert event["genders"] == {"male": 2, "female": 3, "unsure": 1, "unknown": 4}
    assert event["by_group_and_gender"] == [
        {"age_group": "20-39", "gender": "male", "people": 2},
        {"age_group": "20-39", "gender": "female", "people": 3},
        {"age_group": "60+", "gender": "unsure", "people": 1},
        {"age_group": "unknown", "gender": "unknown", "people": 4},
    ]


def test_hourly_counts_of_an_empty_hour_and_bad_rows() -> None:
    empty = hourly_counts("door", [], hour_start=HOUR)
    assert empty["people"] == 0 and set(empty["genders"].values()) == {0}
    assert empty["by_group_and_gender"] == []
    with pytest.raises(ValueError, match="one hour"):
        hourly_counts("door", [])
    two_hours = [CountRow("door", h, "hour", "0-9", "male", 1) for h in (HOUR, HOUR + 3600)]
    with pytest.raises(ValueError, match="got 2 hours"):
        hourly_counts("door", two_hours)
    with pytest.raises(ValueError, match="camera 'yard'"):
        hourly_counts("door", [CountRow("yard", HOUR, "hour", "0-9", "male", 1)])


def test_mqtt_urls() -> None:
    broker = parse_mqtt_url("mqtts://agestream:p%40ss@broker.lan")
    assert (broker.host, broker.port, broker.tls) == ("broker.lan", 8883, True)
    assert (broker.username, broker.password) == ("agestream", "p@ss")
    assert broker.shown == "mqtts://***@broker.lan"
    assert parse_mqtt_url("mqtt://10.0.0.2:1884/").port == 1884
    assert parse_mqtt_url("mqtt://broker").port == 1883


def test_bad_urls_fail_on_one_line_without_their_password() -> None:
    for url in ("http://broker:1883", "mqtt://", "mqtt://u:secret@broker:99999", "u:secret@b"):
        with pytest.raises(ValueError, match="must look like mqtt://host") as caught:
            MqttPublisher(url)
        assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="topic prefix '/a/'"):
        MqttPublisher("mqtt://127.0.0.1:1", topic_prefix="/a/")
    for url in ("ftp://host/x", "https://u:secret@/hook?token=secret", "host:8123/api"):
        with pytest.raises(ValueError, match="must look like http") as caught:
            WebhookPublisher(url)
        assert "secret" not in str(caught.value)


# ---- MQTT --------------------------------------------------------------------------------


class Broker:
    """mosquitto on 127.0.0.1:`port`, started and stopped by its own process handle; with
    `keep_sessions` it saves sessions on stop, so a subscriber misses nothing across a restart."""

    def __init__(self, folder: Path, keep_sessions: bool = False) -> None:
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        lines += [f"persistence {'true' if keep_sessions else 'false'}"]
        lines += [f"persistence_location {folder}/"] if keep_sessions else []
        self.config.write_text("\n".join(lines) + "\n")
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.config)], stdout=log, stderr=log
            )
        wait_for(self._accepts, 10, f"mosquitto on port {self.port} ({self.log.read_text()})")

    def _accepts(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not MOSQUITTO.exists():
        pytest.skip(f"needs mosquitto at {MOSQUITTO}: apt-get install mosquitto")
    running = Broker(tmp_path, keep_sessions=True)
    running.start()
    yield running
    running.stop()


class Subscriber:
    """A paho client that collects every message under `topic`, re-subscribing after each
    reconnect; with a `session` name the broker keeps its subscription while it is away."""

    def __init__(self, port: int, topic: str, session: str | None = None) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=session or "", clean_session=session is None
        )
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _client, _data, message: self.messages.append(message)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the test subscriber could not subscribe"

    def payloads(self, topic: str) -> list[Any]:
        return [_decoded(m.payload) for m in list(self.messages) if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _decoded(payload: bytes | bytearray) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode()


def numbered(count: int, camera: str = "door") -> list[dict[str, Any]]:
    return [person_entered(visit(camera=camera, person=n)) for n in range(count)]


def test_mqtt_events_arrive_on_their_topics_with_counts_retained(broker: Broker) -> None:
    subscriber = Subscriber(broker.port, "shop/#")
    entered, left = person_entered(visit()), person_left(visit())
    counts = hourly_counts("door", [CountRow("door", HOUR, "hour", "20-39", "female", 1)])
    with MqttPublisher(broker.url, topic_prefix="shop", backoff=QUICK) as publisher:
        for event in (entered, left, counts):
            publisher.publish(event)
        wait_for(lambda: publisher.delivered == 3, 10, "3 events delivered")
        wait_for(lambda: len(subscriber.payloads("shop/door/counts/hourly")) == 1, 5, "counts")
        late = Subscriber(broker.port, "shop/door/counts/hourly")
        wait_for(lambda: late.messages, 5, "the retained counts for a late subscriber")
        assert late.messages[0].retain and _decoded(late.messages[0].payload) == counts
        late.close()
    assert subscriber.payloads("shop/door/person_entered") == [entered]
    assert subscriber.payloads("shop/door/person_left") == [left]
    assert subscriber.payloads("shop/door/counts/hourly") == [counts]
    wait_for(lambda: subscriber.payloads("shop/status")[-1:] == ["offline"], 5, "offline")
    assert subscriber.payloads("shop/status") == ["online", "offline"]
    subscriber.close()


def test_a_killed_publisher_is_marked_offline_by_its_last_will(broker: Broker) -> None:
    subscriber = Subscriber(broker.port, "lwt/status")
    script = (
        "import time; from stream.events_out import MqttPublisher\n"
        f"publisher = MqttPublisher({broker.url!r}, topic_prefix='lwt')\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    try:
        wait_for(lambda: subscriber.payloads("lwt/status") == ["online"], 20, "online")
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: subscriber.payloads("lwt/status") == ["online", "offline"], 5, "LWT")
    finally:
        child.kill()
        child.wait(timeout=10)
        subscriber.close()


def test_mqtt_events_wait_while_the_broker_restarts(broker: Broker) -> None:
    subscriber = Subscriber(broker.port, "cut/#", session="cut-subscriber")
    events = numbered(30)
    with MqttPublisher(broker.url, topic_prefix="cut", backoff=QUICK) as publisher:
        publisher.publish(events[0])
        wait_for(lambda: publisher.delivered == 1, 10, "the first event delivered")
        broker.stop()
        started = time.perf_counter()
        for event in events[1:]:
            publisher.publish(event)
        assert time.perf_counter() - started < 0.05
        wait_for(lambda: publisher.failed_attempts >= 2, 10, "failed attempts while down")
        broker.start()
        wait_for(lambda: publisher.delivered == 30, 15, "all 30 events after the restart")
        wait_for(lambda: len(subscriber.payloads("cut/door/person_entered")) == 30, 10, "30")
    assert subscriber.payloads("cut/door/person_entered") == events
    assert publisher.dropped == 0
    subscriber.close()


def test_an_event_counts_as_delivered_once_acknowledged_and_is_sent_once(broker: Broker) -> None:
    subscriber = Subscriber(broker.port, "ack/#")
    event = numbered(1)[0]
    with MqttPublisher(broker.url, topic_prefix="ack", backoff=QUICK, timeout_s=0.2) as publisher:
        wait_for(lambda: subscriber.payloads("ack/status") == ["online"], 10, "online")
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)  # a broker that hangs: no acknowledgement
        try:
            publisher.publish(event)
            wait_for(lambda: publisher.failed_attempts >= 2, 5, "unacknowledged attempts")
            assert publisher.delivered == 0
        finally:
            broker.process.send_signal(signal.SIGCONT)
        wait_for(lambda: publisher.delivered == 1, 5, "delivery once acknowledged")
        wait_for(lambda: subscriber.payloads("ack/door/person_entered"), 5, "the event")
        time.sleep(0.3)  # a second copy, were one sent, would arrive by now
    assert subscriber.payloads("ack/door/person_entered") == [event]
    subscriber.close()


def test_a_full_queue_drops_the_oldest_while_the_broker_is_down(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    broker.stop()
    url = broker.url.replace("mqtt://", "mqtt://user:secret@")
    publisher = MqttPublisher(url, topic_prefix="full", queue_size=10, backoff=QUICK)
    events = numbered(25)
    started = time.perf_counter()
    for event in events:
        publisher.publish(event)
    assert time.perf_counter() - started < 0.05
    wait_for(lambda: publisher.failed_attempts >= 2, 10, "failed attempts while down")
    broker.start()
    subscriber = Subscriber(broker.port, "full/#")
    wait_for(lambda: publisher.delivered + publisher.dropped == 25, 15, "every event settled")
    wait_for(
        lambda: len(subscriber.payloads("full/door/person_entered")) == publisher.delivered,
        5,
        "every delivered event at the subscriber",
    )
    received = subscriber.payloads("full/door/person_entered")
    # The newest ten always arrive, in order; the first may have been on its way already.
    assert received[-10:] == events[-10:] and len(received) in (10, 11)
    assert publisher.dropped == 25 - len(received)
    assert publisher.close() == 0
    subscriber.close()
    full_warnings = [r for r in caplog.records if "queue of 10 is full" in r.getMessage()]
    assert len(full_warnings) == 1, "the full queue must be logged once per 10 s, not per event"
    assert "secret" not in caplog.text and "not delivered" in caplog.text


def test_events_go_out_as_soon_as_the_broker_is_back(broker: Broker) -> None:
    broker.stop()
    # paho reconnects 1 + 2 s after its first failure; the 8 s wait must be cut short then.
    slow = ReconnectPolicy(initial_s=8.0, max_s=8.0)
    with MqttPublisher(broker.url, topic_prefix="back", backoff=slow) as publisher:
        publisher.publish(numbered(1)[0])
        wait_for(lambda: publisher.failed_attempts == 1, 5, "a failed attempt")
        broker.start()
        started = time.monotonic()
        wait_for(lambda: publisher.delivered == 1, 10, "the event after the broker is back")
        assert time.monotonic() - started < 5.5, "delivery waited out the backoff"


def test_home_assistant_discovery_is_announced_retained(broker: Broker) -> None:
    configs = home_assistant_discovery("ha", "front door")
    people_topic, people = configs[0]
    assert people_topic == "homeassistant/sensor/ha_front_door_people_hour/config"
    assert people["state_topic"] == "ha/front door/counts/hourly"
    assert people["availability_topic"] == "ha/status"
    assert people["value_template"] == "{{ value_json.people }}"
    assert people["unique_id"] == "ha_front_door_people_hour"
    default_topic = home_assistant_discovery("agestream", "door")[0][0]
    assert default_topic == "homeassistant/sensor/agestream_door_people_hour/config"
    assert len(configs) == 1 + 6 + 4 and not configs[1][1]["enabled_by_default"]
    assert len({config["unique_id"] for _, config in configs}) == len(configs)
    with MqttPublisher(broker.url, topic_prefix="ha", backoff=QUICK) as publisher:
        publisher.announce(["front door"])
        wait_for(lambda: publisher._client.is_connected(), 10, "connected")
        time.sleep(0.2)  # the retained configs reach the broker
    late = Subscriber(broker.port, "homeassistant/#")
    wait_for(lambda: len(late.messages) == len(configs), 5, "every retained discovery config")
    assert all(message.retain for message in late.messages)
    assert {m.topic: _decoded(m.payload) for m in late.messages} == dict(configs)
    late.close()


# ---- webhooks ----------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1:`port` that records each POST and answers the next of
    `statuses` (then 200)."""

    def __init__(self, port: int | None = None, statuses: tuple[int, ...] = ()) -> None:
        self.port = port or free_port()
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((self.path, dict(self.headers), json.loads(body)))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/agestream"

    def bodies(self) -> list[Any]:
        return [body for _, _, body in self.posts]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_webhook_posts_events_in_order_as_json() -> None:
    receiver = Receiver()
    events = numbered(5)
    headers = {"Authorization": "Bearer token"}
    try:
        with WebhookPublisher(receiver.url, headers=headers, backoff=QUICK) as publisher:
            for event in events:
                publisher.publish(event)
            wait_for(lambda: publisher.delivered == 5, 10, "5 POSTs")
        assert receiver.bodies() == events
        path, sent_headers, _ = receiver.posts[0]
        assert path == "/hooks/agestream"
        assert sent_headers["Content-Type"] == "application/json"
        assert sent_headers["Authorization"] == "Bearer token"
    finally:
        receiver.stop()


def test_webhook_retries_a_busy_receiver_and_delivers_once() -> None:
    receiver = Receiver(statuses=(503, 429))
    try:
        with WebhookPublisher(receiver.url, backoff=QUICK) as publisher:
            publisher.publish(numbered(1)[0])
            wait_for(lambda: publisher.delivered == 1, 10, "delivery after 503, 429")
            assert (publisher.failed_attempts, len(receiver.posts)) == (2, 3)
    finally:
        receiver.stop()


def test_webhook_delivers_after_the_receiver_comes_up() -> None:
    port = free_port()
    events = numbered(3)
    with WebhookPublisher(f"http://127.0.0.1:{port}/x", backoff=QUICK) as publisher:
        for event in events:
            publisher.publish(event)
        wait_for(lambda: publisher.failed_attempts >= 2, 10, "refused connections")
        receiver = Receiver(port)
        try:
            wait_for(lambda: publisher.delivered == 3, 10, "3 events once it is up")
            assert receiver.bodies() == events
        finally:
            receiver.stop()


def test_webhook_drops_an_event_the_receiver_refuses() -> None:
    receiver = Receiver(statuses=(400,))
    events = numbered(2)
    try:
        with WebhookPublisher(receiver.url, backoff=QUICK) as publisher:
            for event in events:
                publisher.publish(event)
            wait_for(lambda: publisher.delivered == 1, 10, "the second event")
            assert (publisher.rejected, publisher.failed_attempts) == (1, 0)
        assert receiver.bodies() == events
    finally:
        receiver.stop()


def test_close_gives_up_on_a_receiver_that_stays_down(caplog: pytest.LogCaptureFixture) -> None:
    slow = ReconnectPolicy(initial_s=5.0, max_s=5.0)  # close must cut the wait short
    publisher = WebhookPublisher(f"http://127.0.0.1:{free_port()}/x", backoff=slow)
    for event in numbered(3):
        publisher.publish(event)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert publisher.close(timeout_s=0.5) == 3
    assert time.monotonic() - started < 2.0
    assert "closed with 3 events undelivered" in caplog.text
    publisher.publish(numbered(1)[0])
    assert (publisher.dropped, publisher.delivered) == (1, 0)
