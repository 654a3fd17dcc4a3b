"""End to end: the `agestream` command on a real clip, and bad sources."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from stream.config import Config
from stream.pipeline import run
from stream.stages import RunSummary
from tests.conftest import HAMILTON, decoded_frame_count, require


def agestream(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_given_shared_clip_when_run_then_every_frame_is_written_with_labelled_faces(
    tmp_path: Path,
) -> None:
    clip = require(HAMILTON)
    video, records = tmp_path / "o.mp4", tmp_path / "o.jsonl"
    done = agestream(
        "run", str(clip), "--no-window", "--output", str(video), "--json", str(records)
    )
    assert done.returncode == 0, done.stderr
    source_frames = decoded_frame_count(clip)
    assert decoded_frame_count(video) == source_frames
    capture = cv2.VideoCapture(str(video))
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
        640,
        360,
    )
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(29.97, abs=0.01)
    start, *lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert start["event"] == "start" and start["source"] == str(clip.resolve())
    assert (start["width"], start["height"], start["estimator"]) == (640, 360, "genderage")
    assert [line["frame"] for line in lines] == list(range(source_frames))
    assert lines[1]["t_ms"] == pytest.approx(1000 / 29.97, abs=0.01)
    faces = [face for line in lines for face in line["faces"]]
    assert len(faces) > source_frames / 2, "the performer is visible in most frames"
    # Unshown: false detections, each new track's first frames (three cuts restart them) and a
    # profile's wait of up to 0.25 s for a view that tells who it is (248 of 277 shown).
    assert sum(face["track"] is not None for face in faces) > 0.85 * len(faces)
    for face in faces:
        assert set(face) == {
            "box",
            "score",
            "age",
            "gender",
            "p_male",
            "track",
            "age_uncertainty",
            "age_raw",
            "p_male_raw",
            "age_std_raw",
            "age_low",
            "age_high",
            "age_low_raw",
            "age_high_raw",
            "quality",
        }
        x1, y1, x2, y2 = face["box"]
        assert x1 < x2 and y1 < y2 and 0 <= face["quality"] <= 1
        assert face["age_raw"] is None or 0 <= face["age_raw"] <= 80
        if face["track"] is None:  # not confirmed yet: not labelled
            assert face["age"] is face["gender"] is face["p_male"] is face["age_low"] is None
            continue
        assert face["age_low"] <= face["age"] <= face["age_high"], "the range holds the age"
        assert isinstance(face["track"], int)
        assert 0 <= face["age"] <= 80
        assert face["gender"] in ("female", "male", "unsure") and 0 <= face["p_male"] <= 1
    assert f"{source_frames} frames" in done.stderr
    assert "0 dropped" in done.stderr


def test_given_max_frames_when_run_then_it_stops_there(tmp_path: Path) -> None:
    clip = require(HAMILTON)
    records = tmp_path / "o.jsonl"
    done = agestream("run", str(clip), "--no-window", "--max-frames", "12", "--json", str(records))
    assert done.returncode == 0, done.stderr
    assert len(records.read_text().splitlines()) == 1 + 12, "the start record, then 12 frames"


def test_given_a_run_then_opencv_runs_single_threaded_during_it_and_as_before_after() -> None:
    clip = require(HAMILTON)
    config = Config()
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, window=False, max_frames=5)
    )
    before = cv2.getNumThreads()
    during: list[int] = []

    run(
        config,
        str(clip),
        RunSummary(source_id=str(clip)),
        on_result=lambda *_: during.append(cv2.getNumThreads()),
    )

    assert during == [1] * 5, "the stages are the parallelism"
    assert cv2.getNumThreads() == before


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(range(256)) * 400)
    return str(path)


@pytest.mark.parametrize(
    ("make_source", "expected"),
    [
        (lambda tmp: str(tmp / "missing.mp4"), "video file not found"),
        (_corrupt, "cannot open video source"),
        (lambda tmp: "rtsp://user:secret@127.0.0.1:9/cam", "cannot open video source rtsp://***@"),
    ],
    ids=["missing file", "corrupt file", "unreachable url"],
)
def test_given_bad_source_then_one_error_line_and_nonzero_exit(
    tmp_path: Path, make_source, expected: str
) -> None:
    done = agestream("run", make_source(tmp_path), "--no-window", timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("agestream: error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "secret" not in done.stderr
