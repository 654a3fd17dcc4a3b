"""StreamHub: shared clips and a real RTSP server served together through one batcher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stream.batcher import EstimateBatcher
from stream.config import Config
from stream.hub import StreamHub
from tests.conftest import HAMILTON, VIDEOS, decoded_frame_count, free_port, require, wait_for

D19 = VIDEOS / "livePortrait__driving__d19.mp4"
D3 = VIDEOS / "livePortrait__driving__d3.mp4"


@pytest.fixture(scope="module")
def batcher():
    from estimators import create_estimator

    require(HAMILTON)
    with EstimateBatcher(create_estimator(Config().estimator)) as shared:
        yield shared


def frames_of(hub: StreamHub, stream_id: str) -> int:
    return hub.status(stream_id).frames


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_outputs(folder: Path, stream_id: str) -> int:
    """The stream's finalized outputs agree: every JSON record names it, one video frame per
    frame record. Returns the frame count."""
    lines = records(folder / f"{stream_id}.jsonl")
    frames = [r for r in lines if "frame" in r]
    assert lines[0]["event"] == "start"
    assert all(r["stream"] == stream_id for r in lines)
    assert frames, f"{stream_id} wrote frames"
    assert decoded_frame_count(folder / f"{stream_id}.mp4") == len(frames)
    assert (folder / f"{stream_id}.csv").read_text().startswith("track_id")
    return len(frames)


def test_given_two_clips_when_served_then_both_run_and_streams_come_and_go(
    batcher: EstimateBatcher, tmp_path: Path
) -> None:
    require(D19), require(D3)
    out = tmp_path / "out"
    hub = StreamHub(Config(), batcher, output_dir=out)
    try:
        first = hub.add(str(HAMILTON))
        second = hub.add(str(D19), "d19")
        assert (first.id, first.state, second.id) == (HAMILTON.stem, "starting", "d19")
        with pytest.raises(ValueError, match="video file not found"):
            hub.add(str(tmp_path / "missing.mp4"))
        with pytest.raises(ValueError, match="already in use"):
            hub.add(str(D3), "d19")
        with pytest.raises(ValueError, match="must not be empty"):
            hub.add(str(D3), " ")
        wait_for(lambda: min(s.frames for s in hub.streams()) >= 60, 40, "frames of both")
        statuses = hub.streams()
        assert [s.id for s in statuses] == [HAMILTON.stem, "d19"]
        assert all(s.state == "running" and 20 < s.fps < 40 for s in statuses), statuses
        assert any(s.tracks for s in statuses), "someone is in view"
        sequence, jpeg = hub.latest_jpeg("d19")
        assert jpeg[:2] == b"\xff\xd8" and sequence >= 60
        assert hub.latest_jpeg("d19", after=10**9) is None

        hub.add(str(D3), "d3")
        wait_for(lambda: frames_of(hub, "d3") >= 10, 20, "frames of the added stream")
        started = time.monotonic()
        hub.remove("d3")
        assert time.monotonic() - started < 3.5
        assert [s.id for s in hub.streams()] == [HAMILTON.stem, "d19"]
        with pytest.raises(KeyError):
            hub.status("d3")
        assert check_outputs(out, "d3") >= 10

        metrics = hub.metrics()
        assert [m["id"] for m in metrics["streams"]] == [HAMILTON.stem, "d19"]
        assert metrics["batcher"]["calls"] > 0 and metrics["batcher"]["mean_batch"] >= 1
        history = hub.history(1)
        assert history[-1]["t"] <= time.time() and sum(h["people"] for h in history) >= 1
    finally:
        hub.close()
    assert check_outputs(out, HAMILTON.stem) >= 60
    assert check_outputs(out, "d19") >= 60


def test_given_rtsp_server_killed_when_served_then_it_recovers_and_the_file_keeps_its_rate(
    batcher: EstimateBatcher,
) -> None:
    from tests.test_rtsp import RtspServer, _has_gst_rtsp_server

    if not _has_gst_rtsp_server():
        pytest.skip("needs GStreamer's RTSP server (see tests/test_rtsp.py)")
    require(D19)
    server = RtspServer(HAMILTON)
    server.start()
    hub = StreamHub(Config(), batcher, loop_files=True)
    try:
        camera = hub.add(server.url("user:secret@"))
        hub.add(str(D19), "file")
        assert camera.id == "cam1" and "secret" not in camera.source
        wait_for(lambda: frames_of(hub, "cam1") >= 20, 30, "RTSP frames")
        wait_for(lambda: frames_of(hub, "file") >= 20, 30, "file frames")

        file_before, killed_at = frames_of(hub, "file"), time.monotonic()
        server.kill()
        wait_for(lambda: hub.status("cam1").state == "reconnecting", 15, "reconnecting")
        server.start()
        frames_then = frames_of(hub, "cam1")
        wait_for(lambda: hub.status("cam1").state == "running", 20, "reconnected")
        wait_for(lambda: frames_of(hub, "cam1") >= frames_then + 10, 15, "frames again")
        outage_s = time.monotonic() - killed_at
        file_fps = (frames_of(hub, "file") - file_before) / outage_s
        print(f"camera back {outage_s:.1f} s after the kill; file {file_fps:.1f} FPS meanwhile")

        assert outage_s < 30
        assert file_fps > 20, f"the file stream kept {file_fps:.1f} FPS during the outage"
        assert hub.status("file").state == "running"
    finally:
        hub.close()
        server.kill()


def test_given_unreachable_camera_when_added_then_add_returns_at_once_and_it_fails(
    batcher: EstimateBatcher,
) -> None:

    with StreamHub(Config(), batcher) as hub:
        started = time.monotonic()
        status = hub.add(f"rtsp://user:secret@127.0.0.1:{free_port()}/x")
        # At once: opening (which fails only after its timeout) is the stream thread's work.
        assert time.monotonic() - started < 2.0
        assert status.state in ("starting", "failed")
        wait_for(lambda: hub.status("cam1").state == "failed", 15, "the stream to fail")
        failed = hub.status("cam1")
        assert "cannot open video source" in failed.error and "secret" not in failed.error
        assert hub.latest_jpeg("cam1") is None
        with pytest.raises(KeyError):
            hub.latest_jpeg("nope")
