"""Tests for stream.sources: parsing, failing fast on bad sources, capture into buffers, and
waiting at start for a camera that is down (without a server; see test_reconnect_at_start)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from stream import sources
from stream.buffers import END_OF_STREAM, BlockingBuffer, LatestFrameBuffer, make_buffer
from stream.sources import (
    CaptureThread,
    ReconnectPolicy,
    SimulatedLiveSource,
    SourceError,
    SourceEvent,
    VideoSource,
    parse_source,
    redact,
)
from stream.types import Frame
from tests.conftest import free_port, wait_for

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLIP = SHARED / "data" / "videos" / "face_recognition__short_hamilton_clip.mp4"
CLIP_FRAMES = 275

needs_clip = pytest.mark.skipif(not CLIP.is_file(), reason=f"shared test clip missing: {CLIP}")


def drain(buffer, delay_s: float = 0.0) -> list[Frame]:
    """Frames taken from `buffer`, one every `delay_s`, up to END_OF_STREAM."""
    frames = []
    while (item := buffer.get(timeout=5.0)) is not END_OF_STREAM:
        frames.append(item)
        time.sleep(delay_s)
    return frames


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert name in message


@pytest.mark.parametrize(
    ("spec", "kind", "target", "source_id"),
    [
        (0, "webcam", 0, "webcam:0"),
        ("1", "webcam", 1, "webcam:1"),
        ("rtsp://cam.local/live", "url", "rtsp://cam.local/live", "rtsp://cam.local/live"),
        ("https://h/x.m3u8", "url", "https://h/x.m3u8", "https://h/x.m3u8"),
        ("rtsp://u:p@h:554/s", "url", "rtsp://u:p@h:554/s", "rtsp://***@h:554/s"),
    ],
)
def test_given_camera_or_url_spec_when_parsed_then_kind_target_and_redacted_id(
    spec, kind, target, source_id
):
    parsed = parse_source(spec)

    assert (parsed.kind, parsed.target, parsed.source_id) == (kind, target, source_id)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://user:secret@10.0.0.2:554/stream", "rtsp://***@10.0.0.2:554/stream"),
        ("http://admin@cam/video?user=x", "http://***@cam/video?user=x"),
        ("rtsp://user:p@ss@cam/s", "rtsp://***@cam/s"),
        ("rtsp://cam/s?next=a@b", "rtsp://cam/s?next=a@b"),
        ("rtsp://cam/s", "rtsp://cam/s"),
    ],
)
def test_given_url_when_redacted_then_no_credentials_remain(url, expected):
    assert redact(url) == expected


@needs_clip
def test_given_existing_file_when_parsed_then_file_spec():
    parsed = parse_source(str(CLIP))

    assert (parsed.kind, parsed.target) == ("file", str(CLIP))


def test_given_missing_file_when_parsed_then_source_error_names_it(tmp_path):
    missing = tmp_path / "nope.mp4"

    with pytest.raises(SourceError, match="video file not found") as error:
        parse_source(str(missing))
    assert_one_line_naming(error, str(missing))


def test_given_directory_when_parsed_then_source_error_names_it(tmp_path):
    with pytest.raises(SourceError, match="directory") as error:
        VideoSource(str(tmp_path))
    assert_one_line_naming(error, str(tmp_path))


def test_given_random_bytes_file_when_opened_then_source_error_names_it(tmp_path):
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(50_000))

    with pytest.raises(SourceError, match="cannot open") as error:
        VideoSource(str(corrupt)).open()
    assert_one_line_naming(error, str(corrupt))


@needs_clip
def test_given_truncated_mp4_when_opened_then_source_error_names_it(tmp_path):
    truncated = tmp_path / "truncated.mp4"
    data = CLIP.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # cuts off the index (moov atom) at the end

    with pytest.raises(SourceError, match="cannot open") as error:
        VideoSource(str(truncated)).open()
    assert_one_line_naming(error, str(truncated))


@needs_clip
def test_given_mp4_with_blanked_media_when_opened_then_first_frame_error(tmp_path):
    # A valid container whose frames are zeros: it opens, but nothing decodes.
    blanked = tmp_path / "blanked.mp4"
    data = CLIP.read_bytes()
    header_end, index_start = data.find(b"mdat") + 8, data.find(b"moov") - 4
    blanked.write_bytes(data[:header_end] + bytes(index_start - header_end) + data[index_start:])

    with pytest.raises(SourceError, match="first frame") as error:
        VideoSource(str(blanked)).open()
    assert_one_line_naming(error, str(blanked))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://127.0.0.1:9/nothing", "rtsp://127.0.0.1:9/nothing"),
        ("rtsp://user:secret@127.0.0.1:9/x", "rtsp://***@127.0.0.1:9/x"),
    ],
)
def test_given_unreachable_url_when_opened_then_fails_fast_with_redacted_error(url, shown):
    start = time.monotonic()

    with pytest.raises(SourceError, match="cannot open") as error:
        VideoSource(url, open_timeout_ms=2000).open()

    assert time.monotonic() - start < 10.0
    assert_one_line_naming(error, shown)
    assert "secret" not in str(error.value)


def test_given_unopened_source_when_info_read_then_source_error():
    with pytest.raises(SourceError, match="not open"):
        _ = VideoSource("rtsp://127.0.0.1:9/nothing").info


@needs_clip
def test_given_clip_when_opened_then_info_describes_file():
    with VideoSource(str(CLIP)) as source:
        info = source.info

    assert (info.width, info.height) == (640, 360)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    assert info.is_file
    assert info.frame_count == CLIP_FRAMES
    assert info.source_id == str(CLIP)


@needs_clip
def test_given_clip_and_slow_consumer_when_captured_then_every_frame_in_order_then_end():
    stop = threading.Event()
    with VideoSource(str(CLIP)) as source:
        buffer = make_buffer(source.info.is_file, maxsize=4, stop_event=stop)
        capture = CaptureThread(source, buffer, stop)
        capture.start()
        frames = drain(buffer, delay_s=0.001)
        capture.join(timeout=2.0)

    assert isinstance(buffer, BlockingBuffer)
    assert [frame.index for frame in frames] == list(range(CLIP_FRAMES))
    assert all(frame.image.shape == (360, 640, 3) for frame in frames)
    assert all(frame.source_id == str(CLIP) for frame in frames)
    timestamps = [frame.timestamp for frame in frames]
    assert timestamps == sorted(timestamps)
    assert capture.frames_read == CLIP_FRAMES
    assert capture.drops == 0
    assert capture.error is None
    assert not capture.is_alive()


@needs_clip
def test_given_simulated_live_source_and_slow_consumer_when_captured_then_drops_counted():
    stop = threading.Event()
    with SimulatedLiveSource(CLIP, fps=500) as source:
        assert not source.info.is_file and source.info.frame_count is None
        buffer = make_buffer(source.info.is_file, maxsize=4)
        capture = CaptureThread(source, buffer, stop)
        capture.start()
        frames = drain(buffer, delay_s=0.01)
        capture.join(timeout=2.0)

    indices = [frame.index for frame in frames]
    assert isinstance(buffer, LatestFrameBuffer)
    assert indices == sorted(set(indices))
    assert indices[-1] == CLIP_FRAMES - 1, "the newest frame survives the end of stream"
    assert capture.frames_read == CLIP_FRAMES
    assert capture.drops > 0
    assert capture.drops == CLIP_FRAMES - len(frames)


@needs_clip
def test_given_simulated_live_source_when_played_then_never_faster_than_its_fps():
    with SimulatedLiveSource(CLIP, fps=200) as source:
        start = time.monotonic()
        for _ in range(41):
            source.read()
        elapsed = time.monotonic() - start

    # Decoding stalls only add time (late frames stay late), hence the loose upper bound.
    assert 40 / 200 - 0.01 <= elapsed < 1.0


@needs_clip
@pytest.mark.parametrize("live", [False, True], ids=["file", "live"])
def test_given_consumer_that_never_reads_when_stop_set_then_capture_ends_within_1s(live):
    stop = threading.Event()
    source = SimulatedLiveSource(CLIP, fps=30) if live else VideoSource(str(CLIP))
    with source:
        buffer = make_buffer(source.info.is_file, maxsize=2, stop_event=stop)
        capture = CaptureThread(source, buffer, stop)
        capture.start()
        time.sleep(0.2)
        assert capture.is_alive()

        set_at = time.monotonic()
        stop.set()
        capture.join(timeout=1.0)

        assert not capture.is_alive()
        assert time.monotonic() - set_at < 1.0
    assert capture.error is None
    drain(buffer)  # raises Empty unless the stream was ended with END_OF_STREAM


class FailingSource(VideoSource):
    """Opens a clip, then fails like a camera that was unplugged."""

    def read(self) -> np.ndarray | None:
        raise SourceError(f"lost video source {self.source_id}")


@needs_clip
def test_given_source_failing_mid_stream_when_captured_then_error_kept_and_stream_ended():
    stop = threading.Event()
    with FailingSource(str(CLIP)) as source:
        buffer = make_buffer(is_file=True, maxsize=4, stop_event=stop)
        capture = CaptureThread(source, buffer, stop)
        capture.start()
        item = buffer.get(timeout=2.0)
        capture.join(timeout=1.0)

    assert item is END_OF_STREAM
    assert isinstance(capture.error, SourceError)
    with pytest.raises(SourceError, match="lost video source"):
        capture.raise_if_failed()


def test_given_policy_when_delays_asked_then_doubling_capped():
    policy = ReconnectPolicy(initial_s=0.25, max_s=2.0)

    assert [policy.delay_s(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(("initial_s", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_given_bad_backoff_when_policy_built_then_value_error(initial_s, max_s):
    with pytest.raises(ValueError, match="ReconnectPolicy"):
        ReconnectPolicy(initial_s=initial_s, max_s=max_s)


def test_given_unknown_rtsp_transport_when_source_built_then_value_error_lists_valid():
    with pytest.raises(ValueError, match="expecting one of tcp, udp"):
        VideoSource("rtsp://127.0.0.1:9/x", rtsp_transport="http")


def test_given_url_when_built_then_reconnects_but_webcam_never_does():
    assert VideoSource("rtsp://127.0.0.1:9/x").reconnect is not None
    assert VideoSource(0).reconnect is None


@needs_clip
def test_given_file_when_built_then_never_reconnects():
    assert VideoSource(str(CLIP)).reconnect is None
    assert SimulatedLiveSource(CLIP).reconnect is None


@needs_clip
def test_given_looping_simulated_source_when_read_past_end_then_starts_over():
    with SimulatedLiveSource(CLIP, fps=10_000, loop=True) as source:
        images = [source.read() for _ in range(CLIP_FRAMES + 5)]

    assert all(image is not None for image in images)
    np.testing.assert_array_equal(images[CLIP_FRAMES], images[0])


def test_given_policy_when_asked_after_hours_of_attempts_then_still_capped() -> None:
    policy = ReconnectPolicy(initial_s=0.25, max_s=4.0)

    # Attempt 1026 comes after about 68 min of attempts every 4 s; 2 ** 1025 overflows a float.
    assert [policy.delay_s(n) for n in (1026, 10**6, 10**12)] == [4.0, 4.0, 4.0]


class OpenInThread:
    """`source.open()` the way a served stream calls it (`with`, then a look at stop_event),
    on a thread of its own; `done` once it returned."""

    def __init__(self, source: VideoSource) -> None:
        self.source = source
        self.done = threading.Event()
        self.stopped: bool | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._open, daemon=True)
        self.thread.start()

    def _open(self) -> None:
        try:
            with ExitStack() as stack:
                stack.enter_context(self.source.open())
                self.stopped = self.source.stop_event.is_set()
        except Exception as error:
            self.error = error
        self.done.set()

    def stop(self) -> float:
        """Seconds from setting stop_event until open() returned (at most 5)."""
        stop_at = time.monotonic()
        self.source.stop_event.set()
        self.done.wait(timeout=5)
        return time.monotonic() - stop_at


def connect_threads(source: VideoSource) -> int:
    """Threads running a connect attempt of `source` (not of other tests' sources)."""
    name = f"connect:{source.source_id}"
    return sum(thread.name == name for thread in threading.enumerate())


@pytest.fixture
def closed_port_url() -> str:
    return f"rtsp://127.0.0.1:{free_port()}/x"


@pytest.fixture
def silent_host() -> Iterator[tuple[str, int]]:
    """A loopback host:port that takes TCP connections (the kernel queues them) and never
    answers: the reachability check passes, and the source's own connect decides."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield listener.getsockname()
    listener.close()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An rtsp:// URL whose host never answers a TCP connection, like an unplugged camera:
    a listener with a full backlog that is never accepted drops further SYNs."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname(), timeout=1)
    yield f"rtsp://127.0.0.1:{listener.getsockname()[1]}/x"
    filler.close()
    listener.close()


def test_given_missing_file_when_built_to_wait_at_start_then_source_error_at_once(
    tmp_path: Path,
) -> None:
    with pytest.raises(SourceError, match="video file not found"):
        VideoSource(str(tmp_path / "nope.mp4"), wait_at_start=True)


def test_given_random_bytes_file_when_opened_with_wait_at_start_then_source_error_at_once(
    tmp_path: Path,
) -> None:
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(50_000))
    source = VideoSource(str(corrupt), wait_at_start=True)
    start = time.monotonic()

    with pytest.raises(SourceError, match="cannot open"):
        source.open()
    assert time.monotonic() - start < 2.0
    assert not source.wait_at_start


def test_given_missing_webcam_when_opened_with_wait_at_start_then_source_error_at_once() -> None:
    source = VideoSource(99, wait_at_start=True)
    start = time.monotonic()

    with pytest.raises(SourceError, match="cannot open video source webcam:99"):
        source.open()
    assert time.monotonic() - start < 5.0


def test_given_url_without_reconnect_policy_when_built_to_wait_at_start_then_value_error() -> None:
    with pytest.raises(ValueError, match="wait_at_start needs a reconnect policy"):
        VideoSource("rtsp://127.0.0.1:9/x", reconnect=None, wait_at_start=True)


def test_given_url_down_at_start_when_waiting_then_attempts_count_up_until_stop_within_1s(
    closed_port_url: str,
) -> None:
    events: list[SourceEvent] = []
    source = VideoSource(
        closed_port_url,
        reconnect=ReconnectPolicy(initial_s=0.05, max_s=0.1),
        on_event=events.append,
        wait_at_start=True,
    )
    opener = OpenInThread(source)
    wait_for(lambda: len(events) >= 5, 10, "five attempts")

    assert not opener.done.is_set(), "open() waits for the source"
    with pytest.raises(SourceError, match="not open"):
        _ = source.info
    assert opener.stop() < 1.0
    assert opener.error is None and opener.stopped is True
    assert [e.attempt for e in events] == list(range(1, len(events) + 1))
    assert all(e.kind == "reconnecting" and e.down_s is None for e in events)
    with pytest.raises(SourceError, match="stopped before it connected"):
        _ = source.info
    assert source.read() is None


def test_given_stop_already_set_when_opened_to_wait_then_returns_without_connecting(
    closed_port_url: str,
) -> None:
    events: list[SourceEvent] = []
    source = VideoSource(closed_port_url, on_event=events.append, wait_at_start=True)
    source.stop_event.set()
    start = time.monotonic()

    with source:
        pass

    assert time.monotonic() - start < 0.5
    assert events == []


def test_given_unanswering_host_when_stopped_during_first_connect_then_open_returns_within_1s(
    blackhole: str,
) -> None:
    source = VideoSource(blackhole, open_timeout_ms=10_000, wait_at_start=True)
    opener = OpenInThread(source)
    time.sleep(0.5)
    assert not opener.done.is_set()

    assert opener.stop() < 1.0
    assert opener.stopped is True


def test_given_source_down_for_many_attempts_then_backoff_capped_and_nothing_accumulates(
    closed_port_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "QUIET_LOG_INTERVAL_S", 0.5)
    events: list[SourceEvent] = []
    seen_threads: list[int] = []
    open_files: list[int] = []

    def on_event(event: SourceEvent) -> None:
        events.append(event)
        seen_threads.append(connect_threads(source))
        open_files.append(len(os.listdir("/proc/self/fd")))

    source = VideoSource(
        closed_port_url,
        reconnect=ReconnectPolicy(initial_s=0.005, max_s=0.02),
        on_event=on_event,
        wait_at_start=True,
    )
    with caplog.at_level(logging.WARNING, logger="stream.sources"):
        opener = OpenInThread(source)
        wait_for(lambda: len(events) >= 100, 20, "a hundred attempts")
        opener.stop()
    lines = [r.getMessage() for r in caplog.records]

    gaps = np.diff([e.timestamp for e in events[10:]])
    assert gaps.min() >= 0.019 and gaps.max() < 0.5, "each wait is the capped 0.02 s"
    assert max(seen_threads) == 0, "each attempt's thread has ended before the next"
    assert open_files[-1] <= open_files[10] + 2, "no sockets or captures left per attempt"
    assert sum("reconnecting in" in line for line in lines) == sources.LOGGED_ATTEMPTS
    assert "logged once a minute from here on" in lines[sources.LOGGED_ATTEMPTS]
    quiet = [line for line in lines if "still down after" in line]
    assert 1 <= len(quiet) < len(events) / 10, "then one line per quiet interval"


def test_given_connect_attempt_that_hangs_when_waiting_then_one_thread_warning_and_stop_works(
    silent_host: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    calls: list[float] = []
    source = VideoSource(
        "rtsp://{}:{}/x".format(*silent_host),
        open_timeout_ms=100,
        read_timeout_ms=100,
        reconnect=ReconnectPolicy(initial_s=0.01, max_s=0.02),
        wait_at_start=True,
    )

    def hanging_connect() -> tuple[object, object]:
        calls.append(time.monotonic())
        release.wait(timeout=30)  # an FFmpeg open that ignores its timeouts
        raise SourceError("cannot open video source: hung")

    monkeypatch.setattr(source, "_connect", hanging_connect)
    with caplog.at_level(logging.WARNING, logger="stream.sources"):
        opener = OpenInThread(source)
        threads = []
        for _ in range(30):  # 3 s: the warning comes 2.3 s after the attempt began
            threads.append(connect_threads(source))
            time.sleep(0.1)
        release.set()
        wait_for(lambda: len(calls) >= 3, 5, "attempts after the hung one")
        assert opener.stop() < 1.0

    assert max(threads) == 1
    hung = [r for r in caplog.records if "still blocked" in r.getMessage()]
    assert len(hung) == 1
    assert len(calls) >= 3
