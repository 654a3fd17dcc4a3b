"""Events out of agestream: the person_entered, person_left and hourly_counts payloads (schema
1, docs/events.md), publishers that push them to an MQTT broker or to webhooks from a bounded
queue drained by one thread (so a receiver that is down never stalls the video pipeline), and
the Home Assistant MQTT discovery configs of a camera's sensors."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from stream.config import package_version
from stream.connections import RateLimiter
from stream.outputs import json_number
from stream.sources import ReconnectPolicy, redact
from stream.types import PERSON_AGE_GROUPS, SHOWN_GENDERS, UNKNOWN, CountRow, Visit
from stream.visits import utc_iso

log = logging.getLogger(__name__)

SCHEMA = 1
COUNTED_AGE_GROUPS = (*PERSON_AGE_GROUPS, UNKNOWN)
COUNTED_GENDERS = (*SHOWN_GENDERS, UNKNOWN)
# Events held while a receiver is down; beyond it the oldest go first.
QUEUE_SIZE = 1000
# Waits between delivery attempts while a receiver is down.
EVENT_BACKOFF = ReconnectPolicy(initial_s=0.5, max_s=30.0)
# paho's longest wait between reconnects: a returning broker gets events soon after.
MQTT_RECONNECT_MAX_S = 10
# How often one kind of delivery problem is logged; repeats in between are counted.
LOG_EVERY_S = 10.0
# HTTP answers worth retrying besides 5xx: request timeout and too many requests.
RETRY_STATUSES = (408, 429)

agestream_version = functools.cache(package_version)


# ---- payloads ----------------------------------------------------------------------------


def iso_utc(unix_s: float) -> str:
    """`unix_s` as ISO 8601 UTC with milliseconds, such as 2025-05-01T14:03:07.250Z."""
    return utc_iso(unix_s, "milliseconds")


def _visit_payload(event: str, visit: Visit, time_s: float) -> dict[str, Any]:
    return {
        "event": event,
        "schema": SCHEMA,
        "camera": visit.camera,
        "run": visit.run,
        "person": visit.person,
        "time": iso_utc(time_s),
        "first_seen": iso_utc(visit.first_seen),
    }


def _person_fields(visit: Visit) -> dict[str, Any]:
    age = json_number(visit.age, 1)
    return {
        "age": age,
        "age_low": json_number(visit.age_low, 1),
        "age_high": json_number(visit.age_high, 1),
        # A NaN age is no age: its group is unknown too.
        "age_group": UNKNOWN if age is None else visit.age_group,
        "gender": visit.counted_gender,
        "confidence": json_number(visit.confidence, 3),
        "agestream": agestream_version(),
    }


def person_entered(visit: Visit) -> dict[str, Any]:
    """The person_entered event of `visit` (its time is the visit's first_seen)."""
    return _visit_payload("person_entered", visit, visit.first_seen) | _person_fields(visit)


def person_left(visit: Visit) -> dict[str, Any]:
    """The person_left event of `visit` (its time is the visit's last_seen)."""
    payload = _visit_payload("person_left", visit, visit.last_seen)
    payload["last_seen"] = iso_utc(visit.last_seen)
    payload["seconds_in_view"] = round(max(0.0, visit.last_seen - visit.first_seen), 1)
    return payload | _person_fields(visit)


def _hour_of(camera: str, rows: Sequence[CountRow], hour_start: float | None) -> float:
    starts = {row.start for row in rows} | ({hour_start} if hour_start is not None else set())
    if len(starts) != 1:
        raise ValueError(
            f"hourly_counts needs the rows of one hour (and hour_start= when there are none), "
            f"but got {len(starts)} hours"
        )
    for row in rows:
        if row.camera != camera or row.period != "hour":
            raise ValueError(
                f"hourly_counts of camera {camera!r} got a {row.period!r} row of camera "
                f"{row.camera!r}: pass only that camera's hour rows"
            )
        if row.age_group not in COUNTED_AGE_GROUPS or row.gender not in COUNTED_GENDERS:
            raise ValueError(
                f"hourly_counts got age group {row.age_group!r}, gender {row.gender!r}: "
                f"expecting one of {COUNTED_AGE_GROUPS} and one of {COUNTED_GENDERS}"
            )
    return starts.pop()


def hourly_counts(
    camera: str, rows: Sequence[CountRow], *, hour_start: float | None = None
) -> dict[str, Any]:
    """The hourly_counts event of one camera's count rows of one hour; `hour_start` (unix
    seconds) names the hour when no one came (`rows` empty: every count 0)."""
    hour = _hour_of(camera, rows, hour_start)
    cells: dict[tuple[str, str], int] = {}
    for row in rows:
        cells[row.age_group, row.gender] = cells.get((row.age_group, row.gender), 0) + row.people
    return {
        "event": "hourly_counts",
        "schema": SCHEMA,
        "camera": camera,
        "hour": iso_utc(hour),
        "people": sum(cells.values()),
        "age_groups": {
            group: sum(n for (g, _), n in cells.items() if g == group)
            for group in COUNTED_AGE_GROUPS
        },
        "genders": {
            gender: sum(n for (_, s), n in cells.items() if s == gender)
            for gender in COUNTED_GENDERS
        },
        "by_group_and_gender": [
            {"age_group": group, "gender": gender, "people": cells[group, gender]}
            for group in COUNTED_AGE_GROUPS
            for gender in COUNTED_GENDERS
            if cells.get((group, gender))
        ],
        "agestream": agestream_version(),
    }


# ---- the queue every publisher shares -----------------------------------------------------


class DeliveryError(Exception):
    """A delivery attempt failed in a way worth retrying: receiver down, timeout, 5xx, 429."""


class Publisher:
    """Pushes events to one receiver from a bounded queue drained by one daemon thread.

    `publish` never blocks: while the receiver is down the thread retries the oldest event
    with `backoff` and new events wait; beyond `queue_size` the oldest waiting one is dropped
    (counted in `dropped`, logged at most once per 10 s). Delivery is at least once: an event
    whose acknowledgement was lost is sent again. Subclasses implement `_send` and call
    `_start` at the end of their constructor.

    Attributes:
        name: the receiver, credentials redacted, for logs.
        delivered: events the receiver acknowledged.
        dropped: events dropped unsent because the queue was full or the publisher closed.
        rejected: events the receiver refused for good (an HTTP 4xx) or that could not be sent.
        failed_attempts: delivery attempts that failed and were retried.
    """

    def __init__(
        self,
        name: str,
        queue_size: int = QUEUE_SIZE,
        backoff: ReconnectPolicy = EVENT_BACKOFF,
        timeout_s: float = 5.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"event queue size must be at least 1, but got {queue_size}")
        if not timeout_s > 0:
            raise ValueError(f"event delivery timeout must be above 0 s, but got {timeout_s}")
        self.name = name
        self.queue_size = queue_size
        self.backoff = backoff
        self.timeout_s = timeout_s
        self.delivered = self.dropped = self.rejected = self.failed_attempts = 0
        self._waiting: deque[dict[str, Any]] = deque()
        self._in_flight: dict[str, Any] | None = None
        self._accepting = True
        self._retry_now = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._limiter = RateLimiter(LOG_EVERY_S)
        self._thread = threading.Thread(target=self._drain, name=f"events to {name}", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _send(self, event: dict[str, Any]) -> bool:
        """Deliver `event`: True once acknowledged, False when refused for good; raise
        DeliveryError to have it retried. Every network call in it has a timeout."""
        raise NotImplementedError

    def _shut_down(self, timeout_s: float) -> None:
        """Release the receiver's connection once the queue stopped (within `timeout_s`)."""

    def publish(self, event: dict[str, Any]) -> None:
        """Queue `event` (a payload of this module's builders) for delivery; never blocks."""
        if not isinstance(event.get("event"), str) or not isinstance(event.get("camera"), str):
            raise ValueError(
                "an event must be a dict with 'event' and 'camera' strings: build it with "
                "stream.events_out's person_entered, person_left or hourly_counts"
            )
        with self._changed:
            problem = ""
            if not self._accepting:
                problem = "is closed: dropped an event published after close"
            else:
                if len(self._waiting) >= self.queue_size:
                    self._waiting.popleft()
                    problem = f"queue of {self.queue_size} is full: dropped the oldest event"
                self._waiting.append(event)
                self._changed.notify_all()
            self.dropped += bool(problem)
            dropped = self.dropped
        if problem:
            self._warn(f"events to {self.name}: {problem}", f" ({dropped} dropped so far)")

    def close(self, timeout_s: float = 5.0) -> int:
        """Stop accepting events, deliver what is queued for at most `timeout_s`, then stop;
        return (and log) how many were left undelivered."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            if self._stop.is_set():
                return self._undelivered()
            self._accepting = False
            self._retry_now = True  # one more attempt now, not after the backoff
            self._changed.notify_all()
            self._changed.wait_for(
                lambda: self._undelivered() == 0 or not self._thread.is_alive(), timeout_s
            )
            self._stop.set()
            self._changed.notify_all()
        # An attempt under way ends within its own network timeout.
        self._thread.join(self.timeout_s + 1.0)
        self._shut_down(max(0.5, deadline - time.monotonic()))
        with self._changed:
            left = self._undelivered()
        if left:
            log.warning("events to %s: closed with %d events undelivered", self.name, left)
        return left

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _undelivered(self) -> int:
        return len(self._waiting) + (self._in_flight is not None)

    def _warn(self, message: str, detail: str = "") -> None:
        left_out = self._limiter.allow(message)
        if left_out is not None:
            suffix = f" ({left_out} more like it not logged)" if left_out else ""
            log.warning("%s%s%s", message, detail, suffix)

    def _retry_soon(self) -> None:
        """Cut the wait before the next attempt short: the receiver is back."""
        with self._changed:
            self._retry_now = True
            self._changed.notify_all()

    def _next_event(self) -> dict[str, Any] | None:
        """The event to send now (the one being retried first); None once stopped."""
        with self._changed:
            while not self._stop.is_set():
                if self._in_flight is None and self._waiting:
                    self._in_flight = self._waiting.popleft()
                if self._in_flight is not None:
                    return self._in_flight
                self._changed.wait(1.0)
            return None

    def _drain(self) -> None:
        failures = 0
        while (event := self._next_event()) is not None:
            try:
                accepted = self._send(event)
            except DeliveryError as error:
                failures += 1
                self.failed_attempts += 1
                self._wait_to_retry(failures, error)
                continue
            except Exception as error:  # an event that is not JSON, or a bug: never retried
                self._warn(f"events to {self.name}: could not send an event", f": {error!r}")
                accepted = False
            if failures:
                log.info(
                    "events to %s: delivering again after %d failed attempts", self.name, failures
                )
            failures = 0
            with self._changed:
                self._in_flight = None
                if accepted:
                    self.delivered += 1
                else:
                    self.rejected += 1
                self._changed.notify_all()

    def _wait_to_retry(self, failures: int, error: DeliveryError) -> None:
        delay_s = self.backoff.delay_s(failures)
        with self._changed:
            waiting = self._undelivered()
        self._warn(
            f"events to {self.name} not delivered",
            f": {error}; retrying in {delay_s:g} s ({waiting} events waiting)",
        )
        with self._changed:
            self._changed.wait_for(lambda: self._stop.is_set() or self._retry_now, delay_s)
            self._retry_now = False


# ---- MQTT ---------------------------------------------------------------------------------


def _shown(url: str) -> str:
    """`url` safe for logs and errors: user and password redacted, even without a scheme."""
    shown = redact(url)
    return shown if "://" in shown or "@" not in shown else "***@" + shown.rsplit("@", 1)[1]


@dataclass(frozen=True)
class MqttBroker:
    """A parsed mqtt:// or mqtts:// URL; `shown` is the URL with its credentials redacted."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    shown: str


def parse_mqtt_url(url: str) -> MqttBroker:
    """The broker of `mqtt://[user:password@]host[:port]` (1883; mqtts:// is TLS, 8883)."""
    shown = _shown(url)
    problem = ValueError(
        f"mqtt URL {shown!r} must look like mqtt://host[:port] (mqtts:// for TLS, "
        f"user:password@ before the host to log in)"
    )
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise problem
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise problem
    try:
        port = parts.port
    except ValueError:
        raise problem from None
    if port == 0:
        raise problem
    tls = parts.scheme == "mqtts"
    unquote = urllib.parse.unquote
    return MqttBroker(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
        shown=shown,
    )


def topic_segment(camera: str) -> str:
    """`camera` as one MQTT topic level: /, +, # and NUL become _."""
    return re.sub(r"[/+#\x00]", "_", camera) or "_"


def _check_prefix(prefix: str) -> None:
    if not prefix or prefix != prefix.strip("/") or re.search(r"[+#\x00]", prefix):
        raise ValueError(
            f"MQTT topic prefix {prefix!r} must be a topic path without +, # or a leading or "
            f"trailing /, such as agestream or home/agestream"
        )


def event_topic(prefix: str, event: dict[str, Any]) -> str:
    """The topic `event` is published on under `prefix`."""
    name = "counts/hourly" if event["event"] == "hourly_counts" else topic_segment(event["event"])
    return f"{prefix}/{topic_segment(event['camera'])}/{name}"


class MqttPublisher(Publisher):
    """Publishes events to an MQTT broker at QoS 1: `{prefix}/{camera}/person_entered`,
    `.../person_left` and `.../counts/hourly` (retained when `retain_counts`), with
    `{prefix}/status` "online" while connected and "offline" (retained; the Last Will too).

    Connecting and reconnecting happen in paho's own thread, so a broker that is down at
    start or goes away only holds events in the queue; an event counts as delivered when the
    broker acknowledged it.
    """

    def __init__(
        self,
        url: str,
        topic_prefix: str = "agestream",
        client_id: str | None = None,
        retain_counts: bool = True,
        *,
        queue_size: int = QUEUE_SIZE,
        backoff: ReconnectPolicy = EVENT_BACKOFF,
        timeout_s: float = 5.0,
        keepalive_s: int = 30,
    ) -> None:
        broker = parse_mqtt_url(url)
        _check_prefix(topic_prefix)
        super().__init__(f"MQTT broker {broker.shown}", queue_size, backoff, timeout_s)
        self.topic_prefix = topic_prefix
        self.status_topic = f"{topic_prefix}/status"
        self.retain_counts = retain_counts
        self._discovery: dict[str, dict[str, Any]] = {}
        # The event whose message paho holds unacknowledged: paho sends it again after a
        # reconnect, so a retry waits for it instead of publishing it twice.
        self._pending: tuple[dict[str, Any], mqtt.MQTTMessageInfo] | None = None
        self._client = self._make_client(broker, client_id, keepalive_s)
        self._start()

    def _make_client(
        self, broker: MqttBroker, client_id: str | None, keepalive_s: int
    ) -> mqtt.Client:
        # Unique, or two publishers would take turns pushing each other off the broker.
        client_id = (
            client_id or f"agestream-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set()  # the system's CAs
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(
            1, min(MQTT_RECONNECT_MAX_S, max(1, math.ceil(self.backoff.max_s)))
        )
        client.connect_timeout = self.timeout_s
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.connect_async(broker.host, broker.port, keepalive=keepalive_s)
        client.loop_start()
        return client

    def announce(self, cameras: Iterable[str], discovery_prefix: str = "homeassistant") -> None:
        """Publish, retained, the Home Assistant discovery configs of `cameras`' sensors, now
        if connected and again after every reconnect (a broker restart loses retained ones)."""
        configs = {
            topic: config
            for camera in cameras
            for topic, config in home_assistant_discovery(
                self.topic_prefix, camera, discovery_prefix
            )
        }
        self._discovery = self._discovery | configs
        if self._client.is_connected():
            for topic, config in configs.items():
                self._client.publish(topic, json.dumps(config), qos=1, retain=True)

    def _send(self, event: dict[str, Any]) -> bool:
        if not self._client.is_connected():
            raise DeliveryError("not connected to the broker")
        if self._pending is not None and self._pending[0] is event:
            info = self._pending[1]
        else:
            retain = self.retain_counts and event["event"] == "hourly_counts"
            info = self._client.publish(
                event_topic(self.topic_prefix, event),
                json.dumps(event, allow_nan=False),
                qos=1,
                retain=retain,
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise DeliveryError(f"publish failed: {mqtt.error_string(info.rc)}")
            self._pending = (event, info)
        info.wait_for_publish(self.timeout_s)
        if not info.is_published():
            raise DeliveryError(f"no acknowledgement within {self.timeout_s:g} s")
        self._pending = None
        return True

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self._warn(f"{self.name} refused the connection", f": {reason}")
            return
        log.info("connected to %s", self.name)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        for topic, config in self._discovery.items():
            client.publish(topic, json.dumps(config), qos=1, retain=True)
        self._retry_soon()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._warn(f"cannot reach {self.name}", "; retrying")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure and not self._stop.is_set():
            self._warn(f"lost the connection to {self.name}", f": {reason}; reconnecting")

    def _shut_down(self, timeout_s: float) -> None:
        # A clean disconnect sends no Last Will: say "offline" first.
        if self._client.is_connected():
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except RuntimeError:  # lost the connection meanwhile: the Last Will says it
                pass
        self._client.disconnect()
        # paho's thread notices within its 1 s select, or its connect timeout while connecting.
        self._client.loop_stop()


def _node_id(prefix: str, camera: str) -> str:
    """The Home Assistant id of `camera` under `prefix` (agestream_door for the default):
    unique per agestream instance as long as their prefixes differ."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}_{camera}")


def _sensor(
    prefix: str, camera: str, key: str, name: str, value: str, enabled: bool
) -> dict[str, Any]:
    node = _node_id(prefix, camera)
    return {
        "name": name,
        "unique_id": f"{node}_{key}",
        "state_topic": f"{prefix}/{topic_segment(camera)}/counts/hourly",
        "value_template": f"{{{{ value_json.{value} }}}}",
        "unit_of_measurement": "people",
        "state_class": "measurement",
        "icon": "mdi:account-group",
        "enabled_by_default": enabled,
        "availability_topic": f"{prefix}/status",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [node],
            "name": f"agestream {camera}",
            "manufacturer": "agestream",
            "model": "camera stream",
            "sw_version": agestream_version(),
        },
        "origin": {"name": "agestream", "sw_version": agestream_version()},
    }


def home_assistant_discovery(
    prefix: str, camera: str, discovery_prefix: str = "homeassistant"
) -> list[tuple[str, dict[str, Any]]]:
    """(topic, config) of the Home Assistant MQTT discovery sensors of `camera`: the people
    counted this hour (its age groups and genders as attributes), then one sensor per age
    group and per gender, disabled until enabled in Home Assistant."""
    people = _sensor(prefix, camera, "people_hour", "People this hour", "people", True)
    people["json_attributes_topic"] = people["state_topic"]
    people["json_attributes_template"] = (
        "{{ {'hour': value_json.hour, 'age_groups': value_json.age_groups, "
        "'genders': value_json.genders} | tojson }}"
    )
    sensors = [("people_hour", people)]
    for group in COUNTED_AGE_GROUPS:
        key = "people_hour_age_" + group.replace("-", "_").replace("+", "plus")
        name = f"People this hour, age {group}"
        sensors.append((key, _sensor(prefix, camera, key, name, f"age_groups['{group}']", False)))
    for gender in COUNTED_GENDERS:
        key = f"people_hour_{gender}"
        name = f"People this hour, {gender}"
        sensors.append((key, _sensor(prefix, camera, key, name, f"genders.{gender}", False)))
    return [
        (f"{discovery_prefix}/sensor/{_node_id(prefix, camera)}_{key}/config", config)
        for key, config in sensors
    ]


# ---- webhooks -----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns a redirect into an HTTPError: urllib would resend a POST as a GET without body."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _webhook_parts(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port != 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        shown = _shown(url.split("?", 1)[0]) + ("?..." if "?" in url else "")
        raise ValueError(
            f"webhook URL {shown!r} must look like http(s)://host[:port]/path, such as "
            f"http://homeassistant.local:8123/api/webhook/agestream"
        )
    return parts


class WebhookPublisher(Publisher):
    """POSTs each event as JSON to `url` (with `headers`, such as an Authorization).

    Connection errors, timeouts, 5xx, 408 and 429 are retried with backoff; any other answer
    outside 2xx (a 4xx, a redirect) drops the event, counted in `rejected` and logged. Logs
    show only the URL's scheme, host and port: a webhook's path often is its secret.
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        timeout_s: float = 5.0,
        *,
        queue_size: int = QUEUE_SIZE,
        backoff: ReconnectPolicy = EVENT_BACKOFF,
    ) -> None:
        parts = _webhook_parts(url)
        host = parts.hostname or ""
        shown = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}"
        shown += f":{parts.port}" if parts.port else ""
        shown += "/..." if parts.path.strip("/") or parts.query else ""
        super().__init__(f"webhook {shown}", queue_size, backoff, timeout_s)
        self.url = url
        self.headers = {
            "Content-Type": "application/json",
            "User-Agent": f"agestream/{agestream_version()}",
            **(headers or {}),
        }
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._start()

    def _send(self, event: dict[str, Any]) -> bool:
        body = json.dumps(event, allow_nan=False).encode()
        request = urllib.request.Request(self.url, body, self.headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s):
                return True
        except urllib.error.HTTPError as error:
            error.close()
            answer = f"HTTP {error.code} {error.reason}"
            if error.code >= 500 or error.code in RETRY_STATUSES:
                raise DeliveryError(answer) from None
            self._warn(f"{self.name} refused an event", f": {answer}; dropped it")
            return False
        except urllib.error.URLError as error:
            raise DeliveryError(f"cannot reach it: {error.reason}") from None
        except TimeoutError:
            raise DeliveryError(f"no answer within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise DeliveryError(f"{type(error).__name__}: {error}") from None
