"""Tests for stream.sources: parsing, failing fast on bad sources, capture into buffers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream.buffers import END_OF_STREAM, BlockingBuffer, LatestFrameBuffer, make_buffer
from stream.sources import (
    CaptureThread,
    ReconnectPolicy,
    SimulatedLiveSource,
    SourceError,
    VideoSource,
    parse_source,
    redact,
)
from stream.types import Frame

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
