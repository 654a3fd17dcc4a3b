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
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream.config import ConfigError
from stream.web import BOUNDARY, check_exposure, create_app, serve_forever
from tests.conftest import chromium_page, keep_screenshot
from tests.fake_hub import FakeHub

TOKEN = "s3cret-token"


@contextmanager
def serving(hub: FakeHub, token: str | None = None, **options: float) -> Iterator[int]:
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
    """One HTTP request; (status, headers with lower-case names, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def call_json(port: int, method: str, path: str, body: object = None) -> tuple[int, object]:
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
        "latency_ms_p95", "error",
    }  # fmt: skip


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
        ({"source": "a.mp4", "name": "x"}, "unknown field 'name', expecting source and id"),
        ({"source": "bad:camera"}, "cannot open 'bad:camera'"),  # the hub's ValueError
        ({"source": "a.mp4", "id": "no spaces"}, "invalid stream id 'no spaces'"),
    ],
)
def test_given_a_bad_body_or_source_when_added_then_400_saying_why(
    port: int, hub: FakeHub, body: object, message: str
):
    status, error = call_json(port, "POST", "/api/streams", body)
    assert status == 400 and error["error"].startswith(message), error
    assert len(hub.streams()) == 2


def test_given_an_id_in_use_when_added_again_then_409(port: int):
    status, error = call_json(port, "POST", "/api/streams", {"source": "b.mp4", "id": "door"})
    assert (status, error) == (409, {"error": "stream id 'door' is already in use"})


def test_when_a_stream_is_deleted_then_204_and_it_is_gone(port: int, hub: FakeHub):
    status, _, data = call(port, "DELETE", "/api/streams/door")
    assert (status, data) == (204, b"")
    assert hub.removed == ["door"]
    assert [s["id"] for s in call_json(port, "GET", "/api/streams")[1]] == ["lobby"]
    assert call_json(port, "DELETE", "/api/streams/door") == (404, {"error": "no stream 'door'"})


def test_history_gives_the_hubs_bins_and_refuses_a_bad_number_of_minutes(port: int):
    status, bins = call_json(port, "GET", "/api/history?minutes=2")
    assert status == 200 and 12 <= len(bins) <= 13
    assert set(bins[0]) == {"t", "age_groups", "genders"}
    assert set(bins[0]["age_groups"]) == {"0-9", "10-19", "20-39", "40-59", "60+"}
    assert call_json(port, "GET", "/api/history")[0] == 200  # 10 minutes by default
    for bad in ("abc", "0", "-1", "nan", "inf", "100000"):
        status, error = call_json(port, "GET", f"/api/history?minutes={bad}")
        assert status == 400 and error["error"].startswith("minutes must be a number"), bad


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
    client.sendall(f"GET /stream/{stream_id}.mjpg HTTP/1.1\r\nHost: x\r\n\r\n".encode())
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
    "path", ["/", "/api/streams", "/api/streams/door", "/api/history", "/metrics",
             "/stream/door.mjpg", "/stream/door.jpg", "/no/such/route"],
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


# ---- the page in Chromium ---------------------------------------------------------------------


def image_shot(page: object, stream_id: str) -> bytes:
    return page.locator(f'article[data-stream="{stream_id}"] img.live').screenshot()


def check_live_page(page: object) -> None:
    """Both live images load and move, stats and tracks show, the charts are drawn."""
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
    drawn = page.evaluate(
        "id => { const c = document.getElementById(id);"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }",
        "chart-age",
    )
    assert drawn > 2000, f"the age chart has {drawn} drawn pixels"


def add_and_remove_through_the_page(page: object, hub: FakeHub) -> None:
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
    with serving(hub, TOKEN) as port, chromium_page(1280, 900) as page:
        base = f"http://127.0.0.1:{port}"
        elsewhere = []
        page.on("request", lambda r: r.url.startswith(base) or elsewhere.append(r.url))
        page.goto(f"{base}/?token={TOKEN}", wait_until="load")
        check_live_page(page)
        page.screenshot(path=str(shot), full_page=True)
        add_and_remove_through_the_page(page, hub)
        assert elsewhere == [], f"the page loaded from elsewhere: {elsewhere}"
    assert shot.stat().st_size > 20_000
    keep_screenshot(shot)
