"""Live RTSP against a real server on loopback: reconnection, events, transport, redaction.

The server is GStreamer's RTSP server run by the system Python (`python3-gi`,
`gir1.2-gst-rtsp-server-1.0`, installed by `.ci/run`), bound to 127.0.0.1 only and
streaming the shared clip; tests skip with a reason where it is not installed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stream.outputs import partial_path
from stream.sources import ReconnectPolicy, SourceEvent, VideoSource
from tests.conftest import HAMILTON, free_port, require, wait_for
from tests.test_shutdown import EXIT_LIMIT_S, interrupt

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = """
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
port, clip = sys.argv[1], sys.argv[2]
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    f'( filesrc location="{clip}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 '
    'config-interval=1 )'
)
factory.set_shared(True)
server.get_mount_points().add_factory("/x", factory)
if server.attach(None) == 0:
    sys.exit("cannot bind")
print("ready", flush=True)
GLib.MainLoop().run()
"""
KILLS = 5


def _has_gst_rtsp_server() -> bool:
    probe = (
        "import gi; gi.require_version('GstRtspServer', '1.0'); "
        "from gi.repository import GstRtspServer"
    )
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(
    not _has_gst_rtsp_server(),
    reason="needs GStreamer's RTSP server for the system python3 (apt: python3-gi "
    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)",
)


class RtspServer:
    """The clip served at rtsp://127.0.0.1:port/x, killable and restartable on the same port."""

    def __init__(self, clip: Path) -> None:
        self.clip = clip
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None

    def url(self, userinfo: str = "") -> str:
        return f"rtsp://{userinfo}127.0.0.1:{self.port}/x"

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", SERVER_SCRIPT, str(self.port), str(self.clip)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready = threading.Event()
        threading.Thread(
            target=lambda: self.process.stdout.readline() == "ready\n" and ready.set(), daemon=True
        ).start()
        if not ready.wait(timeout_s):
            self.kill()
            raise RuntimeError(f"RTSP server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None


@pytest.fixture
def server():
    rtsp = RtspServer(require(HAMILTON))
    rtsp.start()
    yield rtsp
    rtsp.kill()


def records(path: Path) -> list[dict]:
    """The whole lines a running `agestream run --json PATH` has written so far (to the
    partial file it renames when it ends)."""
    path = partial_path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def test_given_rtsp_server_killed_5_times_when_run_then_reconnects_each_time_without_leaking(
    server: RtspServer, tmp_path: Path
) -> None:
    jsonl = tmp_path / "o.jsonl"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream",
            "run",
            server.url("user:secret@"),
            "--no-window",
            "--json",
            str(jsonl),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    recoveries = []
    try:
        wait_for(lambda: any("frame" in r for r in records(jsonl)), 60, "first frame")
        for kill in range(1, KILLS + 1):
            frames_before = sum("frame" in r for r in records(jsonl))
            wait_for(
                lambda: sum("frame" in r for r in records(jsonl)) >= frames_before + 5,
                20,
                "frames after reconnect",
            )
            server.kill()
            killed_at = time.monotonic()
            server.start()
            wait_for(
                lambda: sum(r.get("event") == "reconnected" for r in records(jsonl)) >= kill,
                20,
                f"reconnect {kill}",
            )
            recoveries.append(time.monotonic() - killed_at)
        wait_for(
            lambda: records(jsonl)[-1].get("frame") is not None,
            10,
            "a frame after the last reconnect",
        )
        stopped = interrupt(run, signal.SIGINT)
    finally:
        run.kill()
    stderr = stopped.stderr
    print(f"recovery after kill (s): {[round(r, 2) for r in recoveries]}")

    lines = jsonl.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    events = [r for r in parsed if "event" in r and r["event"] != "start"]
    frames = [r for r in parsed if "frame" in r]
    assert stopped.returncode == 130, stderr
    assert stopped.summary_s < 2.0
    assert stopped.exit_s < EXIT_LIMIT_S
    assert sum(e["event"] == "reconnected" for e in events) == KILLS
    assert all(e["event"] in ("reconnecting", "reconnected") for e in events)
    assert all(set(e) >= {"event", "t_ms", "attempt"} and e["attempt"] >= 1 for e in events)
    assert all(r["down_ms"] > 0 for r in events if r["event"] == "reconnected")
    indices = [r["frame"] for r in frames]
    assert indices == sorted(set(indices)), "frames keep counting; no placeholder frames"
    assert max(recoveries) < 10.0
    assert f"{KILLS} reconnects" in stderr
    assert stderr.count("reconnected to video source rtsp://***@127.0.0.1") == KILLS
    assert "secret" not in stderr


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_given_transport_when_rtsp_opened_then_real_frames_arrive(
    server: RtspServer, transport: str
) -> None:
    with VideoSource(server.url(), rtsp_transport=transport, open_timeout_ms=8000) as source:
        images = [source.read() for _ in range(10)]

    assert (source.info.width, source.info.height) == (640, 360)
    assert all(image is not None and image.shape == (360, 640, 3) for image in images)
    assert all(image.mean() > 5 for image in images), "real picture, not a blank frame"


def test_given_server_gone_when_reconnecting_then_stop_ends_read_within_2s(
    server: RtspServer,
) -> None:
    events: list[SourceEvent] = []
    source = VideoSource(
        server.url(),
        open_timeout_ms=8000,
        read_timeout_ms=1000,
        reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.2),
        on_event=events.append,
    )
    with source:
        server.kill()
        result: list[object] = []
        reader = threading.Thread(target=lambda: result.append(_read_until_none(source)))
        reader.start()
        wait_for(lambda: len(events) >= 3, 15, "three reconnect attempts")
        stop_at = time.monotonic()
        source.stop_event.set()
        reader.join(timeout=5)

        assert not reader.is_alive()
        assert time.monotonic() - stop_at < 2.0
    assert result == [None]
    assert [e.attempt for e in events[:3]] == [1, 2, 3]
    assert all(e.kind == "reconnecting" for e in events)


def _read_until_none(source: VideoSource) -> None:
    while source.read() is not None:
        pass
