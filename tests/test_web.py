"""`agestream serve`'s web app (stream.web) over a fake hub, through real sockets on 127.0.0.1:
the JSON API, MJPEG viewers fast and stalled, Prometheus metrics, the token, and the live page
in headless Chromium."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream.config import ConfigError
from stream.visits import StoreError
from stream.web import BOUNDARY, check_exposure, create_app, serve_forever
from stream.web_guard import HostPolicy, refusal
from tests.conftest import chromium_page, keep_screenshot
from tests.fake_hub import FakeHub

if TYPE_CHECKING:
    from playwright.sync_api import Page

TOKEN = "s3cret-token"


@contextmanager
def serving(hub: FakeHub, token: str | None = None, **options: Any) -> Iterator[int]:
    """serve_forever on 127.0.0.1, any free port, in a thread; yields the port."""
    stop = threading.Event()
    ready: queue.Queue[int] = queue.Queue()
    thread = threading.Thread(
        target=serve_forever,
        args=(hub, "127.0.0.1", 0, token, stop, ready.put),
        kwargs=options,
        daemon=True,
    )
    thread.start()
    try:
        yield ready.get(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive(), "serve_forever did not return after stop was set"


def call(
    port: int, method: str, path: str, body: object = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request, its body sent as JSON unless `headers` name another Content-Type (a
    header given as None is not sent); (status, headers with lower-case names, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if body is not None else {}
        sent = {k: v for k, v in (sent | (headers or {})).items() if v is not None}
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def call_json(port: int, method: str, path: str, body: object = None) -> tuple[int, Any]:
    status, headers, data = call(port, method, path, body)
    assert headers["content-type"].startswith("application/json"), headers
    return status, json.loads(data)


@pytest.fixture
def hub() -> FakeHub:
    hub = FakeHub()
    hub.add("rtsp://camera.local/stream", "door")
    hub.add("/videos/lobby.mp4", "lobby")
    return hub


@pytest.fixture
def port(hub: FakeHub) -> Iterator[int]:
    with serving(hub) as port:
        yield port


# ---- JSON API ---------------------------------------------------------------------------------


def test_given_two_streams_when_listed_then_each_has_its_stats_and_a_track_count(port: int):
    status, streams = call_json(port, "GET", "/api/streams")
    assert status == 200
    assert [s["id"] for s in streams] == ["door", "lobby"]
    door = streams[0]
    assert door["source"] == "rtsp://camera.local/stream"
    assert door["tracks"] == 3 and door["faces"] == 3
    assert door["fps"] == 20.0 and door["latency_ms_p95"] == 42.5
    assert set(door) == {
        "id", "source", "state", "fps", "faces", "tracks", "dropped", "frames",
        "latency_ms_p95", "error", "node",
    }  # fmt: skip
    assert door["node"] is None  # one process: no cluster node


def test_given_a_stream_when_got_then_tracks_is_the_list_of_people_with_json_safe_values(
    port: int,
):
    status, stream = call_json(port, "GET", "/api/streams/door")
    assert status == 200 and stream["id"] == "door"
    first, second, third = stream["tracks"]
    assert first == {
        "track": 1, "age": 34.4, "age_uncertainty": 1.6, "gender": "female",
        "confidence": 0.93, "seconds_in_view": first["seconds_in_view"], "age_low": 28.0,
        "age_high": 41.5,
    }  # fmt: skip
    assert second["age_uncertainty"] is None and second["confidence"] is None
    assert second["age_low"] is None and second["age_high"] is None
    assert third["age"] is None and third["gender"] is None


def test_given_an_unknown_id_when_got_then_404_with_a_json_error(port: int):
    assert call_json(port, "GET", "/api/streams/nope") == (404, {"error": "no stream 'nope'"})
    status, body = call_json(port, "GET", "/stream/nope.mjpg")
    assert status == 404 and "nope" in body["error"]
    status, body = call_json(port, "GET", "/no/such/route")
    assert status == 404 and body == {"error": "not found: /no/such/route"}
    status, body = call_json(port, "PUT", "/api/streams")
    assert status == 405 and "PUT" in body["error"]


def test_when_a_stream_is_added_then_201_with_its_object_and_location(port: int, hub: FakeHub):
    status, headers, data = call(port, "POST", "/api/streams", {"source": "0", "id": "webcam"})
    assert status == 201, data
    stream = json.loads(data)
    assert stream["id"] == "webcam" and stream["source"] == "0"
    assert isinstance(stream["tracks"], list)
    assert headers["location"] == "/api/streams/webcam"
    status, stream = call_json(port, "POST", "/api/streams", {"source": 1})  # a webcam index
    assert status == 201 and stream["id"] == "cam1" and stream["source"] == "1"
    assert [s.id for s in hub.streams()] == ["door", "lobby", "webcam", "cam1"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b"", "the body is not JSON"),
        (b'["rtsp://x"]', "the body is not a JSON object"),
        ({"id": "x"}, '"source" is missing or empty'),
        ({"source": "  "}, '"source" is missing or empty'),
        ({"source": "a.mp4", "id": 7}, '"id" must be a string, got 7'),
        ({"source": "a.mp4", "name": "x"}, "unknown field 'name', expecting source, id and labels"),
        ({"source": "bad:camera"}, "cannot open 'bad:camera'"),  # the hub's ValueError
        ({"source": "a.mp4", "id": "no spaces"}, "invalid stream id 'no spaces'"),
        ({"source": "a.mp4", "labels": ["zone"]}, '"labels" must be an object of names'),
        ({"source": "a.mp4", "labels": {"zone": 3}}, '"labels" must be an object of names'),
        ({"source": "a.mp4", "labels": {"zone": "a b"}}, '"labels" must be an object of names'),
    ],
)
def test_given_a_bad_body_or_source_when_added_then_400_saying_why(
    port: int, hub: FakeHub, body: object, message: str
):
    status, error = call_json(port, "POST", "/api/streams", body)
    assert status == 400 and error["error"].startswith(message), error
    assert len(hub.streams()) == 2


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"source": "/v/" + "x" * 1_000_000}, 413, "the body is larger than 64 KiB"),
        ({"source": "/v/" + "x" * 3000}, 400, '"source" is longer than 2048 characters'),
        (b"[" * 30_000 + b"]" * 30_000, 400, "the body nests too deeply"),
        (b'{"source": ' + b"7" * 5000 + b"}", 400, "numbers in the body must have at most 18"),
    ],
    ids=["1 MB source", "3000-char source", "nested 30000 deep", "5000-digit number"],
)
def test_given_a_huge_or_deep_body_when_added_then_4xx_in_one_line(
    port: int, hub: FakeHub, body: object, status: int, message: str
):
    code, headers, data = call(port, "POST", "/api/streams", body)
    error = json.loads(data)["error"]
    assert code == status and error.startswith(message) and "\n" not in error, (code, error)
    assert len(hub.streams()) == 2


def test_given_labels_when_added_then_the_hub_places_it_by_them(port: int, hub: FakeHub):
    body = {"source": "gate.mp4", "id": "gate", "labels": {"zone": "east", "gpu": "yes"}}
    status, stream = call_json(port, "POST", "/api/streams", body)
    assert status == 201 and stream["node"] is None  # a single-process hub has no nodes
    entry = hub.entries["gate"]
    assert entry is not None and entry.labels == {"zone": "east", "gpu": "yes"}
    assert entry.source == "gate.mp4"


def test_given_an_id_in_use_when_added_again_then_409(port: int):
    status, error = call_json(port, "POST", "/api/streams", {"source": "b.mp4", "id": "door"})
    assert (status, error) == (409, {"error": "stream id 'door' is already in use"})


def test_when_a_stream_is_deleted_then_204_and_it_is_gone(port: int, hub: FakeHub):
    status, _, data = call(port, "DELETE", "/api/streams/door")
    assert (status, data) == (204, b"")
    assert hub.removed == ["door"]
    assert [s["id"] for s in call_json(port, "GET", "/api/streams")[1]] == ["lobby"]
    assert call_json(port, "DELETE", "/api/streams/door") == (404, {"error": "no stream 'door'"})


# ---- counts -----------------------------------------------------------------------------------

MAY_1 = 1714521600  # 2024-05-01T00:00:00Z
HOUR = 3600
EVERY_AGE_GROUP = ("0-9", "10-19", "20-39", "40-59", "60+", "unknown")
EVERY_GENDER = ("male", "female", "unsure", "unknown")


@pytest.fixture
def counted(hub: FakeHub) -> FakeHub:
    """The hub with six stored visits: four on 1 May 10:00-12:00 UTC, one the next day, one
    in April."""
    for camera, first_seen, age, gender in [
        ("door", MAY_1 + 10 * HOUR + 300, 34.0, "female"),
        ("door", MAY_1 + 10 * HOUR + 2400, 8.0, "male"),
        ("door", MAY_1 + 11 * HOUR + 900, None, None),
        ("lobby", MAY_1 + 10 * HOUR + 1200, 65.0, "unsure"),
        ("lobby", MAY_1 + 33 * HOUR, 25.0, "male"),
        ("door", MAY_1 - 11 * 24 * HOUR, 45.0, "female"),
    ]:  # fmt: skip
        hub.add_visit(camera, first_seen, age, gender)
    return hub


def count_rows(rows: list[dict]) -> set[tuple]:
    return {(r["camera"], r["start_utc"], r["period"], r["age_group"], r["gender"], r["people"])
            for r in rows}  # fmt: skip


def test_given_visits_when_counts_are_asked_for_two_hours_then_rows_per_hour_and_totals(
    counted: FakeHub, port: int
):
    status, counts = call_json(
        port, "GET", "/api/counts?from=2024-05-01T10:00:00Z&to=2024-05-01T12:00:00Z"
    )
    assert status == 200
    assert (counts["from"], counts["to"]) == ("2024-05-01T10:00:00Z", "2024-05-01T12:00:00Z")
    assert (counts["by"], counts["camera"]) == ("hour", None)
    assert count_rows(counts["rows"]) == {
        ("door", "2024-05-01T10:00:00Z", "hour", "0-9", "male", 1),
        ("door", "2024-05-01T10:00:00Z", "hour", "20-39", "female", 1),
        ("door", "2024-05-01T11:00:00Z", "hour", "unknown", "unknown", 1),
        ("lobby", "2024-05-01T10:00:00Z", "hour", "60+", "unsure", 1),
    }
    assert {row["start_unix"] for row in counts["rows"]} == {MAY_1 + 10 * HOUR, MAY_1 + 11 * HOUR}
    assert counts["totals"] == {
        "people": 4,
        "age_groups": {"0-9": 1, "10-19": 0, "20-39": 1, "40-59": 0, "60+": 1, "unknown": 1},
        "genders": {"male": 1, "female": 1, "unsure": 1, "unknown": 1},
    }


@pytest.mark.parametrize(
    ("query", "people"),
    [
        (f"from={MAY_1 + 10 * HOUR}&to={MAY_1 + 12 * HOUR}", 4),  # unix seconds
        ("from=2024-05-01T10:00:00&to=2024-05-01T12:00", 4),  # no zone: UTC
        ("from=2024-05-01T12:00:00%2B02:00&to=2024-05-01T11:00:00Z", 3),  # 10:00-11:00 UTC
        ("from=2024-05-01&to=2024-05-03", 5),  # dates: midnight UTC
        (f"from={MAY_1 + 10 * HOUR + 1200.5}&to=2024-05-02", 2),  # not 3: the fraction counts
    ],
)
def test_from_and_to_take_iso_8601_or_unix_seconds(
    counted: FakeHub, port: int, query: str, people: int
):
    status, counts = call_json(port, "GET", f"/api/counts?{query}")
    assert status == 200 and counts["totals"]["people"] == people, counts


def test_given_a_camera_then_only_its_counts_and_an_unknown_camera_counts_nobody(
    counted: FakeHub, port: int
):
    status, counts = call_json(
        port, "GET", "/api/counts?from=2024-05-01&to=2024-05-03&camera=lobby"
    )
    assert status == 200 and counts["camera"] == "lobby"
    assert {row["camera"] for row in counts["rows"]} == {"lobby"}
    assert counts["totals"]["people"] == 2
    status, counts = call_json(port, "GET", "/api/counts?from=2024-05-01&to=2024-05-03&camera=x")
    assert status == 200 and counts["rows"] == [] and counts["totals"]["people"] == 0
    assert set(counts["totals"]["age_groups"]) == set(EVERY_AGE_GROUP)
    assert set(counts["totals"]["genders"]) == set(EVERY_GENDER)


def test_given_by_day_then_rows_per_utc_day(counted: FakeHub, port: int):
    status, counts = call_json(port, "GET", "/api/counts?from=2024-04-01&to=2024-05-03&by=day")
    assert status == 200 and counts["by"] == "day"
    assert count_rows(counts["rows"]) == {
        ("door", "2024-04-20T00:00:00Z", "day", "40-59", "female", 1),
        ("door", "2024-05-01T00:00:00Z", "day", "0-9", "male", 1),
        ("door", "2024-05-01T00:00:00Z", "day", "20-39", "female", 1),
        ("door", "2024-05-01T00:00:00Z", "day", "unknown", "unknown", 1),
        ("lobby", "2024-05-01T00:00:00Z", "day", "60+", "unsure", 1),
        ("lobby", "2024-05-02T00:00:00Z", "day", "20-39", "male", 1),
    }
    assert counts["totals"]["people"] == 6


def test_given_no_range_then_the_last_24_hours(hub: FakeHub, port: int):
    now = time.time()
    hub.add_visit("door", now - 3600, 30.0, "male")
    hub.add_visit("door", now - 25 * 3600, 30.0, "male")
    status, counts = call_json(port, "GET", "/api/counts")
    assert status == 200 and counts["totals"]["people"] == 1
    start, end = (datetime.fromisoformat(counts[key]).timestamp() for key in ("from", "to"))
    assert end - start == pytest.approx(24 * 3600, abs=0.002) and abs(end - now) < 5
    status, counts = call_json(port, "GET", f"/api/counts?to={int(now - 2 * 3600)}")
    assert status == 200 and counts["totals"]["people"] == 1  # the 24 h before `to`


def test_given_a_server_without_a_store_then_counts_are_empty(port: int):
    status, counts = call_json(port, "GET", "/api/counts")
    assert status == 200 and counts["rows"] == [] and counts["totals"]["people"] == 0


def test_cameras_are_every_camera_with_counts_and_every_served_stream(counted: FakeHub, port: int):
    counted.add_visit("garage", MAY_1, 30.0, "male")  # a camera no longer served
    assert call_json(port, "GET", "/api/cameras") == (200, ["door", "garage", "lobby"])


def test_counts_csv_is_an_attachment_with_the_counts_header_and_one_line_per_row(
    counted: FakeHub, port: int
):
    query = "from=2024-05-01T10:00:00Z&to=2024-05-01T12:00:00Z&camera=door"
    status, headers, data = call(port, "GET", f"/api/counts.csv?{query}")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"] == (
        'attachment; filename="agestream-counts-20240501T100000Z-20240501T120000Z.csv"'
    )
    lines = data.decode().splitlines()
    assert lines[0] == "camera,start_utc,period,age_group,gender,people"
    assert sorted(lines[1:]) == [
        "door,2024-05-01T10:00:00Z,hour,0-9,male,1",
        "door,2024-05-01T10:00:00Z,hour,20-39,female,1",
        "door,2024-05-01T11:00:00Z,hour,unknown,unknown,1",
    ]
    status, _, data = call(port, "GET", "/api/counts.csv?from=2024-05-01&to=2024-05-03&by=day")
    assert status == 200 and len(data.decode().splitlines()) == 1 + 5


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("from=yesterday", "from must be an ISO 8601 time"),
        ("to=2024-13-01", "to must be an ISO 8601 time"),
        ("from=nan", "from must be an ISO 8601 time"),
        ("to=inf", "to must be an ISO 8601 time"),
        ("from=-5&to=10", "from must be an ISO 8601 time"),
        ("to=1e30", "to must be an ISO 8601 time"),
        ("from=" + "9" * 5000, "from must be an ISO 8601 time"),
        ("from=2024-05-02&to=2024-05-01", "from (2024-05-02T00:00:00Z) must be before to"),
        ("from=2024-05-01&to=2024-05-01", "from (2024-05-01T00:00:00Z) must be before to"),
        ("from=2023-01-01&to=2024-05-01", "the range from 2023-01-01T00:00:00Z to "),
        ("from=2024-05-01&to=2024-05-02&by=week", "by must be hour or day, got 'week'"),
        ("since=2024-05-01", "unknown parameter 'since', expecting from, to, camera and by"),
        ("camera=" + "c" * 300, "camera is longer than 200 characters"),
    ],
)
def test_given_a_bad_query_then_counts_and_csv_answer_400_in_one_line(
    counted: FakeHub, port: int, query: str, message: str
):
    for path in ("/api/counts", "/api/counts.csv"):
        status, headers, data = call(port, "GET", f"{path}?{query}")
        assert headers["content-type"].startswith("application/json")
        error = json.loads(data)["error"]
        assert status == 400 and error.startswith(message), (path, error)
        assert "\n" not in error and len(error) < 200


def test_given_the_hub_refuses_the_counts_query_then_400_with_its_first_line(
    counted: FakeHub, port: int, monkeypatch: pytest.MonkeyPatch
):
    def refuse(*args: object, **options: object) -> list:
        raise ValueError("the visits store cannot count 'x'\nsecond line")

    monkeypatch.setattr(counted, "counts", refuse)
    status, error = call_json(port, "GET", "/api/counts?camera=x")
    assert (status, error) == (400, {"error": "the visits store cannot count 'x'"})


def test_given_a_store_that_cannot_be_read_then_503_saying_so(
    counted: FakeHub, port: int, monkeypatch: pytest.MonkeyPatch
):
    def fail(*args: object, **options: object) -> list:
        raise StoreError("cannot read the visits store visits.db: disk I/O error\ndetail")

    monkeypatch.setattr(counted, "counts", fail)
    monkeypatch.setattr(counted, "cameras", fail)
    for path in ("/api/counts", "/api/counts.csv", "/api/cameras"):
        status, headers, data = call(port, "GET", path)
        assert status == 503 and headers["content-type"].startswith("application/json")
        error = json.loads(data)["error"]
        assert error == "cannot read the visits store visits.db: disk I/O error", path


def test_the_page_and_its_files_are_served_and_refer_to_nothing_outside(port: int):
    status, headers, page = call(port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="static/app.js"' in page and b'href="static/app.css"' in page
    assert "default-src 'self'" in headers["content-security-policy"]
    for name in ("app.js", "app.css"):
        status, _, data = call(port, "GET", f"/static/{name}")
        assert status == 200 and b"http://" not in data and b"https://" not in data


# ---- metrics ----------------------------------------------------------------------------------


def test_metrics_are_prometheus_text_with_a_series_per_stream_and_the_batcher(port: int):
    status, headers, data = call(port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(data.decode())
        for sample in family.samples
    }
    for stream in ("door", "lobby"):
        label = (("stream", stream),)
        assert samples[("agestream_stream_fps", label)] == 20.0
        assert samples[("agestream_stream_faces_total", label)] == 3
        assert samples[("agestream_stream_latency_p95_seconds", label)] == 0.0425
        assert ("agestream_stream_frames_total", label) in samples
        assert ("agestream_stream_dropped_frames_total", label) in samples
        running = (("state", "running"), ("stream", stream))
        assert samples[("agestream_stream_state", running)] == 1.0
    assert samples[("agestream_streams", ())] == 2
    assert samples[("agestream_batcher_calls_total", ())] == 120
    assert samples[("agestream_batcher_faces_total", ())] == 300
    assert samples[("agestream_batcher_mean_batch", ())] == 2.5


def test_each_app_has_its_own_registry_not_the_global_one(hub: FakeHub):
    create_app(hub, None)
    create_app(hub, None)  # a second app registers the same names without a clash
    assert b"agestream_" not in generate_latest(REGISTRY)


# ---- MJPEG ------------------------------------------------------------------------------------


def read_part(response: http.client.HTTPResponse) -> bytes | None:
    """The next JPEG of a multipart/x-mixed-replace body, or None at its closing boundary."""
    line = response.readline()
    while line in (b"\r\n", b"\n"):
        line = response.readline()
    if line.strip() == f"--{BOUNDARY}--".encode() or not line:
        return None
    assert line.strip() == f"--{BOUNDARY}".encode(), line
    headers = {}
    while (line := response.readline().strip()) != b"":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    assert headers["content-type"] == "image/jpeg"
    jpeg = response.read(int(headers["content-length"]))
    assert jpeg[:3] == b"\xff\xd8\xff" and jpeg[-2:] == b"\xff\xd9"
    return jpeg


@contextmanager
def viewing(port: int, stream_id: str) -> Iterator[http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", f"/stream/{stream_id}.mjpg")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == (
            f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        )
        yield response
    finally:
        connection.close()


def test_given_a_viewer_then_mjpeg_delivers_distinct_newest_frames(port: int):
    with viewing(port, "door") as response:
        parts = [read_part(response) for _ in range(5)]
    assert len(set(parts)) == 5  # each part a newer frame, none repeated


def test_given_a_viewer_when_its_stream_is_removed_then_the_mjpeg_response_ends(port: int):
    with viewing(port, "lobby") as response:
        assert read_part(response) is not None
        assert call(port, "DELETE", "/api/streams/lobby")[0] == 204
        started = time.monotonic()
        while read_part(response) is not None:
            assert time.monotonic() - started < 3
        assert response.read() == b""


def test_given_a_viewer_when_its_file_ends_then_the_last_frame_is_sent_and_the_response_ends(
    port: int, hub: FakeHub
):
    with viewing(port, "lobby") as response:
        assert read_part(response) is not None
        hub.items["lobby"].last = hub.items["lobby"].sequence() + 2
        started, parts = time.monotonic(), []
        while (part := read_part(response)) is not None:
            parts.append(part)
            assert time.monotonic() - started < 3
        assert response.read() == b"" and 1 <= len(parts) <= 3


def stalled_viewer(port: int, stream_id: str) -> socket.socket:
    """A client that asks for the MJPEG stream and then reads nothing."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(
        f"GET /stream/{stream_id}.mjpg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    )
    return client


def closed_within(client: socket.socket, seconds: float) -> bool:
    """Whether the server closes `client` within `seconds` (reading what was buffered)."""
    client.settimeout(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.recv(1 << 20) == b"":
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            continue
    return False


def test_given_a_stalled_viewer_then_a_fast_one_still_gets_frames_and_the_stalled_is_dropped():
    # Large noisy frames fill the stalled viewer's socket buffers within a second or two.
    hub = FakeHub(fps=20.0, size=(960, 540))
    hub.add("rtsp://camera.local/big", "big")
    with serving(hub, write_timeout_s=0.5) as port:
        stalled = stalled_viewer(port, "big")
        try:
            time.sleep(2.5)  # long enough for its writes to block past the timeout
            with viewing(port, "big") as response:
                started = time.monotonic()
                parts = {read_part(response) for _ in range(10)}
                fast_seconds = time.monotonic() - started
            assert len(parts) == 10 and fast_seconds < 3, fast_seconds
            assert closed_within(stalled, 8), "the stalled viewer was never dropped"
        finally:
            stalled.close()


def test_the_newest_frame_alone_is_a_jpeg(port: int):
    status, headers, data = call(port, "GET", "/stream/door.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert data[:3] == b"\xff\xd8\xff"


def test_given_a_viewer_when_stop_is_set_then_serve_forever_returns_within_a_second(hub: FakeHub):
    stop = threading.Event()
    ready: queue.Queue[int] = queue.Queue()
    thread = threading.Thread(
        target=serve_forever, args=(hub, "127.0.0.1", 0, None, stop, ready.put), daemon=True
    )
    thread.start()
    with viewing(ready.get(timeout=10), "door") as response:
        assert read_part(response) is not None
        started = time.monotonic()
        stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive() and time.monotonic() - started < 1.0


# ---- token and exposure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/api/streams", "/api/streams/door", "/api/counts",
             "/api/counts.csv?by=day", "/api/cameras", "/metrics", "/stream/door.mjpg",
             "/stream/door.jpg", "/no/such/route"],
)  # fmt: skip
def test_given_a_token_then_every_route_needs_it(hub: FakeHub, path: str):
    with serving(hub, TOKEN) as port:
        status, headers, data = call(port, "GET", path)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert "missing or wrong token" in json.loads(data)["error"]
        wrong = call(port, "GET", path, headers={"Authorization": "Bearer nope"})
        assert wrong[0] == 401
        assert call(port, "GET", f"{path}?token=nope")[0] == 401
        if path.endswith(".mjpg"):
            return  # the good-token cases would stream forever; MJPEG is tested above
        expected = 404 if path == "/no/such/route" else 200
        assert call(port, "GET", path, headers={"Authorization": f"Bearer {TOKEN}"})[0] == expected
        separator = "&" if "?" in path else "?"
        assert call(port, "GET", f"{path}{separator}token={TOKEN}")[0] == expected


def test_given_a_token_then_the_pages_script_and_style_need_none(hub: FakeHub):
    with serving(hub, TOKEN) as port:
        assert call(port, "GET", "/static/app.js")[0] == 200
        assert call(port, "GET", "/static/app.css")[0] == 200


def test_given_a_token_then_posting_needs_it_too(hub: FakeHub):
    with serving(hub, TOKEN) as port:
        assert call(port, "POST", "/api/streams", {"source": "x.mp4"})[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert call(port, "POST", "/api/streams", {"source": "x.mp4"}, auth)[0] == 201
        assert call(port, "DELETE", "/api/streams/cam1")[0] == 401
        assert call(port, "DELETE", f"/api/streams/cam1?token={TOKEN}")[0] == 204


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "camera-box.local"])
def test_given_a_host_beyond_loopback_without_a_token_then_serving_is_refused(host: str):
    with pytest.raises(ConfigError, match="without a token: pass --token or set AGESTREAM_TOKEN"):
        check_exposure(host, None)
    with pytest.raises(ConfigError):
        check_exposure(host, "")
    check_exposure(host, TOKEN)


def test_the_refusal_names_the_address():
    with pytest.raises(ConfigError) as error:
        check_exposure("0.0.0.0", None)
    assert str(error.value) == (
        "refusing to serve on 0.0.0.0 without a token: pass --token or set AGESTREAM_TOKEN"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_given_a_loopback_host_then_no_token_is_needed(host: str):
    check_exposure(host, None)


def test_serve_forever_refuses_before_binding_anything(hub: FakeHub):
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0"):
        serve_forever(hub, "0.0.0.0", 0, None, threading.Event())


def test_an_empty_token_is_refused_rather_than_meaning_none(hub: FakeHub):
    with pytest.raises(ValueError, match="non-empty"):
        create_app(hub, "")


# ---- cross-site requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_given_no_token_when_a_change_is_not_sent_as_json_then_415_and_nothing_changes(
    port: int, hub: FakeHub, content_type: str | None
):
    # What any web page can send without asking: a form, or fetch with a "simple" type.
    body = json.dumps({"source": "rtsp://evil.example/x", "id": "evil"}).encode()
    status, _, data = call(port, "POST", "/api/streams", body, {"Content-Type": content_type})
    shown = "none" if content_type is None else repr(content_type)
    assert (status, json.loads(data)) == (
        415, {"error": f"Content-Type must be application/json, got {shown}"}
    )  # fmt: skip
    if content_type is not None:
        status, _, _ = call(
            port, "DELETE", "/api/streams/door", b"", {"Content-Type": content_type}
        )
        assert status == 415
    assert [s.id for s in hub.streams()] == ["door", "lobby"]


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost.evil.example:{port}", ""],
)
def test_given_no_token_then_a_foreign_host_is_refused_and_loopback_names_are_not(
    port: int, hub: FakeHub, host: str
):
    # DNS rebinding: another site's name resolving to 127.0.0.1 reaches this server.
    host = host.format(port=port)
    for method, path, body in [
        ("GET", "/", None), ("GET", "/api/streams", None), ("GET", "/stream/door.jpg", None),
        ("POST", "/api/streams", {"source": "x.mp4"}), ("DELETE", "/api/streams/door", None),
    ]:  # fmt: skip
        status, _, data = call(port, method, path, body, {"Host": host})
        assert status == 403, (method, path, status)
        assert json.loads(data)["error"].startswith(f"Host {host!r} is not this server")
    assert [s.id for s in hub.streams()] == ["door", "lobby"]
    for name in ("127.0.0.1", "localhost", "LocalHost", "[::1]"):
        assert call(port, "GET", "/api/streams", None, {"Host": f"{name}:{port}"})[0] == 200


def test_given_allowed_hosts_then_those_names_are_accepted_too(hub: FakeHub):
    with serving(hub, allowed_hosts=("box.local", "cam.lan:8080")) as port:
        for host, expected in [
            ("box.local", 200), ("box.local:1234", 200), ("cam.lan:8080", 200),
            ("cam.lan:9090", 403), ("cam.lan", 403), ("other.lan", 403), (f"127.0.0.1:{port}", 200),
        ]:  # fmt: skip
            assert call(port, "GET", "/api/streams", None, {"Host": host})[0] == expected, host


def test_given_another_sites_origin_when_changing_then_403_and_the_own_origin_is_accepted(
    port: int, hub: FakeHub
):
    for origin in (
        "http://evil.example", "null", f"http://127.0.0.1:{port}.evil.example",
        "http://127.0.0.1:1", f"http://localhost:{port}", f"ftp://127.0.0.1:{port}",
    ):  # fmt: skip
        for method, path in [("POST", "/api/streams"), ("DELETE", "/api/streams/door")]:
            body = {"source": "x.mp4"} if method == "POST" else None
            status, _, data = call(port, method, path, body, {"Origin": origin})
            assert status == 403, (origin, method, status)
            assert json.loads(data)["error"].startswith("cross-site request refused"), origin
    assert [s.id for s in hub.streams()] == ["door", "lobby"]
    own = {"Origin": f"http://127.0.0.1:{port}"}
    assert call(port, "GET", "/api/streams", None, {"Origin": "http://evil.example"})[0] == 200
    assert call(port, "POST", "/api/streams", {"source": "x.mp4", "id": "x"}, own)[0] == 201
    assert call(port, "DELETE", "/api/streams/x", None, own)[0] == 204


def test_given_every_address_with_a_token_then_any_host_passes_but_origins_are_still_checked():
    anywhere = HostPolicy.for_server("0.0.0.0", TOKEN)
    headers = {"Host": "camera-box.example:8080"}
    assert refusal("GET", headers, 8080, anywhere) is None
    assert refusal("POST", headers | {"Content-Type": "application/json"}, 8080, anywhere) is None
    status, message = refusal("POST", headers | {"Origin": "http://evil.example"}, 8080, anywhere)
    assert status == 403 and message.startswith("cross-site request refused")
    listed = HostPolicy.for_server("0.0.0.0", TOKEN, ("camera-box.example",))
    assert refusal("GET", headers, 8080, listed) is None
    assert refusal("GET", {"Host": "evil.example"}, 8080, listed)[0] == 403
    with pytest.raises(ValueError, match="allowed host 'http://x' is not a host name"):
        HostPolicy.for_server("127.0.0.1", None, ("http://x",))


# ---- slow and flooding clients ----------------------------------------------------------------


def slow_client(port: int) -> socket.socket:
    """A client that starts its request's headers and never finishes them."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(f"GET /api/streams HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
    return client


def is_closed(client: socket.socket) -> bool:
    """Whether the server has closed `client`, without waiting."""
    client.setblocking(False)
    try:
        return client.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_given_clients_that_never_finish_their_headers_then_they_are_closed_after_the_timeout(
    hub: FakeHub,
):
    with serving(hub, header_timeout_s=1.0) as port:
        clients = [slow_client(port) for _ in range(5)]
        try:
            started = time.monotonic()
            assert all(closed_within(client, 5) for client in clients)
            assert time.monotonic() - started < 4
        finally:
            for client in clients:
                client.close()


def test_given_more_slow_clients_than_the_cap_then_the_oldest_make_room_and_the_api_answers(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
):
    with serving(hub, max_connections=20) as port:
        clients = [slow_client(port) for _ in range(60)]
        try:
            started = time.monotonic()
            assert call(port, "GET", "/api/streams")[0] == 200
            assert time.monotonic() - started < 2
            time.sleep(0.3)
            closed = [is_closed(client) for client in clients]
            assert closed == [True] * 41 + [False] * 19  # the oldest 40 and 1 for the API call
        finally:
            for client in clients:
                client.close()
    made_room = [r for r in caplog.records if "closed the longest idle" in r.getMessage()]
    assert len(made_room) == 1, "41 evictions, one log line"


def test_given_every_connection_busy_then_a_newcomer_gets_503_in_one_json_line(hub: FakeHub):
    with serving(hub, max_connections=2) as port:
        with viewing(port, "door"), viewing(port, "lobby"):
            status, headers, data = call(port, "GET", "/api/streams")
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(data) == {"error": "too many connections busy: try again shortly"}
        assert call(port, "GET", "/api/streams")[0] == 200  # the viewers are gone


def test_given_a_body_that_never_arrives_then_408_within_the_body_timeout(hub: FakeHub):
    with serving(hub, body_timeout_s=0.5) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(
                f"POST /api/streams HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                'application/json\r\nContent-Length: 100\r\n\r\n{"source"'.encode()
            )
            started = time.monotonic()
            response = client.recv(1 << 16)
        assert time.monotonic() - started < 3
        assert response.startswith(b"HTTP/1.1 408 ")
        assert response.endswith(b'{"error": "the body did not arrive within 0.5 s"}')
    assert len(hub.streams()) == 2


def test_given_a_flood_of_malformed_requests_then_the_log_has_one_line_and_no_traceback(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
):
    with serving(hub) as port:
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n")
                assert client.recv(1 << 16).split(b" ")[1] == b"400"
        assert call(port, "GET", "/api/streams")[0] == 200
    server_lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(server_lines) == 1 and server_lines[0].exc_info is None
    assert "Error handling request" in server_lines[0].getMessage()
    assert "\n" not in caplog.text.strip()


# ---- the page in Chromium ---------------------------------------------------------------------


def image_shot(page: Page, stream_id: str) -> bytes:
    return page.locator(f'article[data-stream="{stream_id}"] img.live').screenshot()


def check_live_page(page: Page) -> None:
    """Both live images load and move, stats and tracks show, the counts show."""
    page.wait_for_function(
        "() => { const i = [...document.querySelectorAll('img.live')];"
        " return i.length === 2 && i.every(x => x.complete && x.naturalWidth > 0); }",
        timeout=10_000,
    )
    for stream_id in ("door", "lobby"):
        first = image_shot(page, stream_id)
        page.wait_for_timeout(400)
        assert image_shot(page, stream_id) != first, f"{stream_id}'s image did not change"
    page.wait_for_function(
        "() => [...document.querySelectorAll('.stats')].every(s => /\\d+\\.\\d FPS/.test("
        "s.textContent)) && [...document.querySelectorAll('article.stream')].every("
        "a => a.querySelectorAll('tbody tr').length === 3)",
        timeout=5_000,
    )
    stats = page.locator('article[data-stream="door"] .stats').inner_text()
    assert "20.0 FPS" in stats and "latency p95 43 ms" in stats
    rows = page.locator('article[data-stream="door"] tbody tr').all_inner_texts()
    assert rows[0].split("\t") == ["#1", "28–42", "female 93%", rows[0].split("\t")[3]]
    # The counts view (tests/test_counts_page.py tests it in depth): the one visit of the day.
    page.wait_for_function(
        "() => document.getElementById('counts-total').textContent === '1'", timeout=5_000
    )


def add_and_remove_through_the_page(page: Page, hub: FakeHub) -> None:
    page.fill("#add-source", "rtsp://garage.local/cam")
    page.fill("#add-id", "garage")
    page.click("#add-form button")
    page.wait_for_function(
        "() => { const i = document.querySelector('article[data-stream=\"garage\"] img.live');"
        " return i && i.naturalWidth > 0; }",
        timeout=5_000,
    )
    page.fill("#add-source", "bad:camera")
    page.click("#add-form button")
    page.wait_for_function("() => document.getElementById('add-error').textContent", timeout=5000)
    assert "cannot open 'bad:camera'" in page.locator("#add-error").inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click('article[data-stream="garage"] button.remove')
    page.wait_for_selector('article[data-stream="garage"]', state="detached", timeout=5000)
    assert hub.removed == ["garage"]
    # Streams added and removed elsewhere (another browser, the API) come and go.
    hub.add("/videos/back.mp4", "back")
    page.wait_for_selector('article[data-stream="back"]', timeout=5000)
    hub.remove("back")
    page.wait_for_selector('article[data-stream="back"]', state="detached", timeout=5000)


def test_given_two_streams_then_chromium_shows_the_live_page_and_can_add_and_remove(
    hub: FakeHub, tmp_path: Path
):
    shot = tmp_path / "serve-page-fake-hub.png"
    hub.add_visit("door", time.time() - 600, 34.0, "female")
    with serving(hub, TOKEN) as port, chromium_page(1280, 900) as page:
        base = f"http://127.0.0.1:{port}"
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(f"{base}/?token={TOKEN}", wait_until="load")
        check_live_page(page)
        page.screenshot(path=str(shot), full_page=True)
        add_and_remove_through_the_page(page, hub)
        elsewhere = [url for url in asked if not url.startswith(base)]
        assert elsewhere == [], f"the page loaded from elsewhere: {elsewhere}"
    assert shot.stat().st_size > 20_000
    keep_screenshot(shot)
