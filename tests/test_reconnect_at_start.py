"""A camera that is down when its stream starts, against GStreamer's real RTSP server on
loopback: `VideoSource(..., wait_at_start=True)` waits in `open` until the server comes up, and
a camera that never answers does not hold up other sources' opens.

Uses the server of test_rtsp (the system python3 with GstRtspServer); skips where it is absent.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from stream.sources import ReconnectPolicy, SourceEvent, VideoSource
from tests.conftest import HAMILTON, require, wait_for
from tests.test_rtsp import RtspServer, _has_gst_rtsp_server

pytestmark = pytest.mark.skipif(
    not _has_gst_rtsp_server(),
    reason="needs GStreamer's RTSP server for the system python3 (apt: python3-gi "
    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)",
)


@pytest.fixture
def server() -> Iterator[RtspServer]:
    """The clip's RTSP server on a free port, not started."""
    rtsp = RtspServer(require(HAMILTON))
    yield rtsp
    rtsp.kill()


def open_in_thread(source: VideoSource) -> tuple[threading.Thread, list[float]]:
    """`source.open()` on its own thread, and a list that gets the time it returned."""
    returned: list[float] = []

    def opener() -> None:
        source.open()
        returned.append(time.monotonic())

    thread = threading.Thread(target=opener, daemon=True)
    thread.start()
    return thread, returned


def test_given_server_down_at_start_when_it_comes_up_then_open_returns_and_frames_flow(
    server: RtspServer, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[SourceEvent] = []
    source = VideoSource(
        server.url("user:secret@"),
        open_timeout_ms=8000,
        reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.2),
        on_event=events.append,
        wait_at_start=True,
    )
    caplog.set_level(logging.WARNING, logger="stream.sources")
    started = time.monotonic()
    thread, returned = open_in_thread(source)
    try:
        wait_for(lambda: len(events) >= 4, 10, "four attempts while no server listens")
        assert not returned, "open() waits while the server is down"

        server.start()
        up_at = time.monotonic()
        thread.join(timeout=15)
        assert returned, "open() returned once the server came up"
        images = [source.read() for _ in range(10)]
    finally:
        source.stop_event.set()
        thread.join(timeout=5)
        source.close()

    print(f"open() returned {returned[0] - up_at:.2f} s after the server was ready")
    assert returned[0] - up_at < 10.0
    assert (source.info.width, source.info.height) == (640, 360)
    assert all(image is not None and image.shape == (360, 640, 3) for image in images)
    *waiting, up = events
    assert [e.attempt for e in waiting] == list(range(1, len(waiting) + 1))
    assert all(e.kind == "reconnecting" for e in waiting)
    assert (up.kind, up.attempt) == ("reconnected", waiting[-1].attempt)
    assert up.down_s is not None and up_at - started < up.down_s < returned[0] - started
    assert source.reconnects == 1
    logged = caplog.text
    assert "connected to video source rtsp://***@127.0.0.1" in logged
    assert "secret" not in logged


def test_given_camera_that_never_answers_when_waiting_then_other_sources_open_unhindered(
    server: RtspServer,
) -> None:
    # OpenCV opens one FFmpeg capture at a time in a process: an attempt on a host that never
    # answers must not hold that lock for its whole open timeout.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname(), timeout=1)  # fills the backlog
    unplugged = VideoSource(
        f"rtsp://127.0.0.1:{listener.getsockname()[1]}/x",
        open_timeout_ms=10_000,
        reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.2),
        wait_at_start=True,
    )
    server.start()
    try:
        waiting, returned = open_in_thread(unplugged)
        time.sleep(0.5)  # its first attempt is under way
        start = time.monotonic()
        with VideoSource(server.url(), open_timeout_ms=8000) as camera:
            opened_s = time.monotonic() - start
            image = camera.read()
        assert not returned, "the unplugged camera is still waiting"
    finally:
        unplugged.stop_event.set()
        waiting.join(timeout=5)
        filler.close()
        listener.close()

    print(f"the other camera opened in {opened_s:.2f} s")
    assert opened_s < 5.0, "not held up for the unplugged camera's 10 s open timeout"
    assert image is not None and image.shape == (360, 640, 3)
    assert not waiting.is_alive()
