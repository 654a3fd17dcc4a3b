"""`agestream serve` for real: two shared clips in one process, the JSON API over real sockets,
the live page in headless Chromium, and SIGINT/SIGTERM finalizing every stream's outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream.web import HEADER_TIMEOUT_S
from tests.conftest import (
    HAMILTON,
    VIDEOS,
    chromium_page,
    decoded_frame_count,
    free_port,
    keep_screenshot,
    require,
)

S32 = VIDEOS / "livePortrait__source__s32.mp4"
START_S = 60.0


def recording(folder: Path, stream_id: str) -> Path:
    """The one recording of `stream_id` in `folder`: `ID-<UTC start>`, without a suffix."""
    (jsonl,) = [p for p in folder.glob(f"{stream_id}-*.jsonl") if not p.stem.endswith(".partial")]
    return jsonl.with_suffix("")


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    output_dir: Path
    token: str | None

    def call(self, method: str, path: str, body: object = None, token: str | None = None):
        """(status, parsed JSON or text) of one request; `token` defaults to the server's."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if (token or self.token) is not None:
            request.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        is_json = text.startswith(("{", "["))
        return status, json.loads(text) if is_json else text

    def wait_running(self, count: int) -> list[dict]:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                status, streams = self.call("GET", "/api/streams")
                running = [s for s in streams if s["state"] == "running" and s["frames"] > 30]
                if status == 200 and len(running) >= count:
                    return streams
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{count} streams not running in {START_S} s")

    def stop(self, signum: int = signal.SIGINT) -> str:
        self.process.send_signal(signum)
        _, stderr = self.process.communicate(timeout=30)
        return stderr


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Server] = []

    def start(*sources: Path, token: str | None = None) -> Server:
        port, output_dir = free_port(), tmp_path / "out"
        command = [sys.executable, "-m", "stream", "serve", *map(str, sources), "--loop"]
        command += ["--port", str(port), "--output-dir", str(output_dir), "--store", "video"]
        env = {**os.environ, "AGESTREAM_TOKEN": token or ""}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        started.append(Server(process, port, output_dir, token))
        return started[-1]

    yield start
    for server in started:
        server.process.kill()
        server.process.communicate()


def test_given_two_clips_then_the_api_lists_adds_and_removes_streams(serve) -> None:
    server = serve(require(S32), require(HAMILTON))
    streams = server.wait_running(2)
    assert [s["id"] for s in streams] == [S32.stem, HAMILTON.stem]
    assert all(s["fps"] > 5 and s["frames"] > 0 for s in streams)
    status, added = server.call("POST", "/api/streams", {"source": str(S32), "id": "third"})
    assert status == 201 and added["id"] == "third"
    for path in ("/no/such.mp4", "/etc/hostname", "/etc"):  # which exist is not told
        assert server.call("POST", "/api/streams", {"source": path}) == (
            400, {"error": f"cannot open {path!r}: no such video file, or not one this server "
                  "can decode"},
        )  # fmt: skip
    assert server.call("POST", "/api/streams", {"source": "udp://239.0.0.1:5000"}) == (
        400, {"error": "unsupported scheme 'udp': use rtsp://, rtsps://, http://, https://, file://"}
    )  # fmt: skip
    assert server.call("POST", "/api/streams", {"source": str(S32), "id": "third"})[0] == 409
    assert server.call("POST", "/api/streams", "not an object")[0] == 400
    server.wait_running(3)
    status, third = server.call("GET", "/api/streams/third")
    assert status == 200 and isinstance(third["tracks"], list)
    assert server.call("DELETE", "/api/streams/third")[0] == 204
    assert server.call("DELETE", "/api/streams/third")[0] == 404
    assert [s["id"] for s in server.call("GET", "/api/streams")[1]] == [S32.stem, HAMILTON.stem]
    status, metrics = server.call("GET", "/metrics")
    assert status == 200 and f'agestream_stream_frames_total{{stream="{S32.stem}"}}' in metrics
    assert "agestream_batcher_mean_batch" in metrics
    stderr = server.stop()
    assert server.process.returncode == 0, stderr
    assert recording(server.output_dir, "third"), "a removed stream's outputs are kept"


def test_given_a_token_then_requests_without_it_are_refused(serve) -> None:
    server = serve(require(S32), token="s3cret")
    server.wait_running(1)
    assert server.call("GET", "/api/streams", token="wrong")[0] == 401
    assert server.call("GET", f"/api/streams?token={server.token}")[0] == 200
    server.stop()


def test_given_a_host_beyond_loopback_without_a_token_then_serve_refuses_at_once() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "serve", str(require(S32)), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "AGESTREAM_TOKEN": ""},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "agestream: config error: refusing to serve on 0.0.0.0 without a token: "
        "pass --token or set AGESTREAM_TOKEN"
    )


def api_latencies(server: Server, count: int) -> list[float]:
    """Seconds each of `count` GET /api/streams took (each must answer 200)."""
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        assert server.call("GET", "/api/streams")[0] == 200
        latencies.append(time.monotonic() - started)
    return latencies


def test_given_300_clients_that_never_finish_their_headers_then_the_api_and_streams_go_on(
    serve,
) -> None:
    server = serve(require(S32))
    frames_before = server.wait_running(1)[0]["frames"]
    clients = []
    try:
        for _ in range(300):  # more than MAX_CONNECTIONS: the oldest make room
            client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            client.sendall(b"GET /api/streams HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            clients.append(client)
        attacked_at = time.monotonic()
        during = api_latencies(server, 10)
        for client in clients:  # each closed by the server once its header timeout is over
            client.settimeout(max(0.1, attacked_at + HEADER_TIMEOUT_S + 10 - time.monotonic()))
            assert client.recv(1024) == b""
        closed_s = time.monotonic() - attacked_at
        after = api_latencies(server, 10)
    finally:
        for client in clients:
            client.close()
    stream = server.call("GET", "/api/streams")[1][0]
    print(
        f"API latency with 300 slow clients: max {max(during) * 1000:.0f} ms; all closed by the "
        f"server {closed_s:.1f} s after; then max {max(after) * 1000:.0f} ms; "
        f"{stream['frames'] - frames_before} frames meanwhile"
    )
    assert max(during) < 1.0 and max(after) < 1.0
    assert stream["state"] == "running" and stream["frames"] > frames_before + 10
    stderr = server.stop()
    assert server.process.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr.count("connections open") <= 2, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_given_serving_when_signalled_then_every_streams_outputs_are_finalized(
    serve, signum: int
) -> None:
    server = serve(require(S32), require(HAMILTON))
    server.wait_running(2)
    time.sleep(2.0)
    stderr = server.stop(signum)
    assert server.process.returncode == 0, stderr
    for stem in (S32.stem, HAMILTON.stem):
        base = recording(server.output_dir, stem)
        jsonl, video = base.with_name(f"{base.name}.jsonl"), base.with_name(f"{base.name}.mp4")
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        frames = [r for r in records if "frame" in r]
        assert frames and all(r["stream"] == stem for r in records)
        assert decoded_frame_count(video) == len(frames)
        assert f"wrote {jsonl} ({len(records)} lines)" in stderr
    assert not list(server.output_dir.glob("*.partial.*"))


def test_given_two_clips_served_then_chromium_shows_both_live_with_tracks(
    serve, tmp_path: Path
) -> None:
    server = serve(require(S32), require(HAMILTON))
    server.wait_running(2)
    shot = tmp_path / "serve-page.png"
    with chromium_page(1280, 960) as page:
        page.goto(f"http://127.0.0.1:{server.port}/", timeout=20_000)
        check_both_live(page)
        page.screenshot(path=str(shot), full_page=True)
    keep_screenshot(shot)
    server.stop()


def check_both_live(page: object) -> None:
    """Both streams' images load and change, and their stats show FPS and a track row."""
    page.wait_for_function(
        "() => { const i = [...document.querySelectorAll('img.live')];"
        " return i.length === 2 && i.every(x => x.complete && x.naturalWidth > 0); }",
        timeout=20_000,
    )
    for stream_id in (S32.stem, HAMILTON.stem):
        image = page.locator(f'article[data-stream="{stream_id}"] img.live')
        first = image.screenshot()
        page.wait_for_timeout(500)
        assert image.screenshot() != first, f"{stream_id}'s image did not change"
    page.wait_for_function(
        "() => [...document.querySelectorAll('.stats')].every(s => /\\d+\\.\\d FPS/.test("
        "s.textContent)) && [...document.querySelectorAll('article.stream')].every("
        "a => a.querySelectorAll('tbody tr').length >= 1)",
        timeout=20_000,
    )
