"""StreamHub: shared clips and a real RTSP server served together through one batcher."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.batcher import EstimateBatcher
from stream.config import Config, StreamEntry
from stream.hub import ServedStream, StreamHub
from stream.sinks import RunOutputs
from stream.types import FrameResult
from stream.visits import open_store
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


def recordings(folder: Path, stream_id: str) -> list[Path]:
    """The stream's recordings, oldest first: `ID-<UTC start>[-n]` (no suffix), one per time
    the id was added."""
    name = re.compile(re.escape(stream_id) + r"-\d{8}T\d{6}Z(-\d+)?")
    found = [p for p in folder.glob("*.jsonl") if name.fullmatch(p.stem)]
    return [p.with_suffix("") for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def check_outputs(folder: Path, stream_id: str, base: Path | None = None) -> int:
    """The stream's finalized outputs (its only recording, unless `base` names one) agree:
    every JSON record names it, one video frame per frame record. Returns the frame count."""
    if base is None:
        (base,) = recordings(folder, stream_id)
    lines = records(base.with_name(base.name + ".jsonl"))
    frames = [r for r in lines if "frame" in r]
    assert lines[0]["event"] == "start"
    assert all(r["stream"] == stream_id for r in lines)
    assert frames, f"{stream_id} wrote frames"
    assert decoded_frame_count(base.with_name(base.name + ".mp4")) == len(frames)
    assert base.with_name(base.name + ".csv").read_text().startswith("track_id")
    return len(frames)


def test_given_two_clips_when_served_then_both_run_and_streams_come_and_go(
    batcher: EstimateBatcher, tmp_path: Path
) -> None:
    require(D19), require(D3)
    out = tmp_path / "out"
    store = open_store(tmp_path / "visits.db")
    hub = StreamHub(Config(), batcher, output_dir=out, store=store)
    try:
        first = hub.add(str(HAMILTON))
        second = hub.add(str(D19), "d19")
        assert (first.id, first.state, second.id) == (HAMILTON.stem, "starting", "d19")
        with pytest.raises(ValueError, match="no such video file"):
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
    finally:
        hub.close()
    assert check_outputs(out, HAMILTON.stem) >= 60
    assert check_outputs(out, "d19") >= 60
    # Each stream's people, kept as visits: every track of its CSV is one, none twice.
    visits = store.visits(0, time.time() + 1)
    for stream_id in (HAMILTON.stem, "d19", "d3"):
        (csv_file,) = out.glob(f"{stream_id}-*.csv")
        people = {row.split(",")[0] for row in csv_file.read_text().splitlines()[1:]}
        kept = [visit for visit in visits if visit.camera == stream_id]
        assert {str(visit.person) for visit in kept} == people and all(v.ended for v in kept)
    counted = sum(row.people for row in hub.counts(0, time.time() + 1))
    assert counted == len(visits) >= 3
    assert hub.cameras() == sorted([HAMILTON.stem, "d19", "d3"])
    store.close()


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


def test_given_a_camera_down_when_the_hub_starts_then_it_runs_once_the_camera_answers(
    batcher: EstimateBatcher, tmp_path: Path
) -> None:
    from tests.test_rtsp import RtspServer, _has_gst_rtsp_server

    if not _has_gst_rtsp_server():
        pytest.skip("needs GStreamer's RTSP server (see tests/test_rtsp.py)")
    server = RtspServer(HAMILTON)  # not started yet: the camera is down
    store = open_store(tmp_path / "visits.db")
    hub = StreamHub(Config(), batcher, store=store)
    try:
        hub.add(server.url(), "door")
        wait_for(lambda: hub.status("door").state == "reconnecting", 15, "reconnecting")
        time.sleep(3.0)
        assert hub.status("door").state == "reconnecting"
        server.start()
        wait_for(lambda: hub.status("door").state == "running", 30, "running once it answers")
        wait_for(lambda: frames_of(hub, "door") >= 30, 30, "frames of the camera")
    finally:
        hub.close()
        server.kill()
    assert "door" in store.cameras(), "its people were counted once it answered"
    store.close()


def test_given_unreachable_camera_when_added_then_add_returns_at_once_and_it_reconnects(
    batcher: EstimateBatcher,
) -> None:
    with StreamHub(Config(), batcher) as hub:
        started = time.monotonic()
        status = hub.add(f"rtsp://user:secret@127.0.0.1:{free_port()}/x")
        # At once: opening is the stream thread's work; a camera that is down is waited for.
        assert time.monotonic() - started < 2.0
        assert status.state in ("starting", "reconnecting")
        wait_for(lambda: hub.status("cam1").state == "reconnecting", 15, "reconnecting")
        time.sleep(6.0)  # beyond the open timeout: still waiting, never "failed"
        waiting = hub.status("cam1")
        assert (waiting.state, waiting.error) == ("reconnecting", None)
        assert hub.latest_jpeg("cam1") is None
        with pytest.raises(KeyError):
            hub.latest_jpeg("nope")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5.0, "a stream waiting for its camera stops at once"


def test_given_another_url_scheme_then_add_says_unsupported_scheme(batcher) -> None:
    with StreamHub(Config(), batcher) as hub:
        with pytest.raises(ValueError) as error:
            hub.add("udp://239.0.0.1:5000")
    assert str(error.value) == (
        "unsupported scheme 'udp': use rtsp://, rtsps://, http://, https://, file://"
    )
    assert hub.streams() == []


def test_given_paths_missing_unreadable_or_no_video_then_add_refuses_them_all_alike(
    batcher, tmp_path: Path
) -> None:
    # One message for all, so that an API client cannot tell which paths exist on the server.
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video")
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    paths = [tmp_path / "missing.mp4", notes, folder, tmp_path / ("n" * 300), "/etc/hostname"]
    with StreamHub(Config(), batcher) as hub:
        for path in paths:
            with pytest.raises(ValueError) as error:
                hub.add(str(path))
            assert re.fullmatch(
                r"cannot open '[^\n]{1,210}': no such video file, or not one this server can "
                r"decode",
                str(error.value),
            ), str(error.value)
        assert hub.streams() == []


@pytest.mark.parametrize(
    ("stream_id", "source", "message"),
    [
        ("x" * 5000, None, "stream id is 5000 characters long; at most 64"),
        (None, "9" * 5000, "webcam index '99999999999999999999...' is out of range"),
        (None, "²", "webcam index '²' is out of range"),
    ],
    ids=["5000-char id", "5000-digit webcam", "superscript digit"],
)
def test_given_a_long_id_or_a_bad_webcam_index_then_add_refuses_in_one_short_line(
    batcher, tmp_path: Path, stream_id: str | None, source: str | None, message: str
) -> None:
    with StreamHub(Config(), batcher, output_dir=tmp_path) as hub:
        with pytest.raises(ValueError) as error:
            hub.add(source or str(D19), stream_id)
        assert hub.streams() == []
    assert str(error.value).startswith(message) and len(str(error.value)) < 200
    assert list(tmp_path.iterdir()) == []


def test_given_a_remove_racing_the_add_of_its_id_then_both_succeed(batcher, monkeypatch) -> None:
    # A thread that is slow to start: DELETE came between the id being taken and the start.
    real_start = ServedStream.start

    def slow_start(stream: ServedStream) -> None:
        time.sleep(0.5)
        real_start(stream)

    monkeypatch.setattr(ServedStream, "start", slow_start)
    with StreamHub(Config(), batcher) as hub:
        added: list = []
        adder = threading.Thread(target=lambda: added.append(hub.add(str(D19), "race")))
        adder.start()
        wait_for(lambda: [s.id for s in hub.streams()] == ["race"], 10, "the id to be taken")
        hub.remove("race")
        adder.join(5)
        assert added and added[0].id == "race"
        assert hub.streams() == []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_given_files_in_the_output_dir_when_streams_come_and_go_then_none_is_overwritten(
    batcher, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.mp4").write_bytes(b"an earlier recording")
    shutil.copy(D19, out / "y.mp4")  # another stream's input, named like the next id
    kept = {path: digest(path) for path in out.iterdir()}
    with StreamHub(Config(), batcher, output_dir=out, loop_files=True) as hub:
        hub.add(str(out / "y.mp4"), "input")
        for stream_id in ("x", "y", "a", "a.partial"):  # "a.partial": a's partial name, once
            hub.add(str(D19), stream_id)
        wait_for(lambda: min(s.frames for s in hub.streams()) >= 10, 90, "frames of all")
        for _ in range(3):  # one id added and removed again and again
            hub.add(str(D19), "c")
            wait_for(lambda: frames_of(hub, "c") >= 5, 60, "frames of c")
            hub.remove("c")
    with StreamHub(Config(), batcher, output_dir=out) as hub:  # a restart, the same id again
        hub.add(str(D19), "a")
        wait_for(lambda: frames_of(hub, "a") >= 5, 60, "frames of a, restarted")
    assert {path: digest(path) for path in kept} == kept
    for stream_id in ("input", "x", "y", "a.partial"):
        check_outputs(out, stream_id)
    assert len(recordings(out, "a")) == 2 and len(recordings(out, "c")) == 3
    for base in recordings(out, "a") + recordings(out, "c"):
        check_outputs(out, base.name.split("-")[0], base)
    assert not list(out.glob("*.partial.*"))


def test_given_a_stream_slow_to_finalize_when_the_hub_closes_then_it_waits_for_its_outputs(
    batcher, tmp_path: Path, monkeypatch
) -> None:
    # Thirty streams on two cores take this long to stop; closing the models and exiting
    # under them crashed the process (exit 134) and left partial files.
    real_close = RunOutputs.close

    def slow_close(outputs: RunOutputs) -> None:
        time.sleep(7.0)
        real_close(outputs)

    monkeypatch.setattr(RunOutputs, "close", slow_close)
    hub = StreamHub(Config(), batcher, output_dir=tmp_path)
    hub.add(str(D19), "slow")
    wait_for(lambda: frames_of(hub, "slow") >= 5, 60, "frames of the stream")
    started = time.monotonic()
    hub.close()
    assert time.monotonic() - started >= 7.0
    assert check_outputs(tmp_path, "slow") >= 5
    assert not list(tmp_path.glob("*.partial.*"))


def sharpness(image: np.ndarray, boxes: np.ndarray) -> list[float]:
    """Laplacian variance of the middle of each box (off its outline and label)."""
    values = []
    for x1, y1, x2, y2 in boxes.astype(int):
        dx, dy = (x2 - x1) // 4, (y2 - y1) // 4
        crop = cv2.cvtColor(image[y1 + dy : y2 - dy, x1 + dx : x2 - dx], cv2.COLOR_BGR2GRAY)
        if crop.size >= 64:
            values.append(float(cv2.Laplacian(crop, cv2.CV_64F).var()))
    return values


def test_given_a_region_of_interest_then_only_faces_centred_in_it_are_tracked_and_counted(
    batcher: EstimateBatcher, tmp_path: Path
) -> None:
    seen: dict[str, list[np.ndarray]] = {"all": [], "left": []}
    right_sharpness: dict[str, list[float]] = {"all": [], "left": []}

    def keep(stream_id: str, result: FrameResult, now: float) -> None:
        width = result.frame.image.shape[1]
        seen[stream_id].append(result.faces.xyxy.copy() / width)
        # The faces on the right half, as drawn: "left" blurs them though it ignores them.
        boxes = result.faces.xyxy if result.outside is None else result.outside.xyxy
        right = boxes[(boxes[:, 0] + boxes[:, 2]) / 2 >= width / 2]
        right_sharpness[stream_id] += sharpness(result.frame.image, right)

    blur_left = StreamEntry(
        source=str(HAMILTON), roi=(0, 0, 0.5, 1), settings={"output": {"blur": True}}
    )
    with StreamHub(Config(), batcher, on_result=keep) as hub:
        hub.add(str(HAMILTON), "all")
        hub.add(str(HAMILTON), "left", blur_left)
        wait_for(lambda: min(s.frames for s in hub.streams()) >= 90, 60, "frames of both")
    centres = {name: np.concatenate(boxes)[:, [0, 2]].mean(axis=1) for name, boxes in seen.items()}
    # Hamilton's clip has faces on both halves of the frame.
    assert (centres["all"] < 0.5).any() and (centres["all"] >= 0.5).any()
    assert len(centres["left"]) and (centres["left"] < 0.5).all()
    # Left out of the region, still blurred: privacy does not depend on where one stands.
    assert right_sharpness["left"] and right_sharpness["all"]
    blurred, sharp = np.median(right_sharpness["left"]), np.median(right_sharpness["all"])
    assert blurred < sharp / 4, (blurred, sharp)
