"""Bad input: fatal problems are one error line and a non-zero exit, per-frame problems are
logged skips or handled frames, and nothing hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import HAMILTON, frame_records, require

TIMEOUT_S = 90


def agestream(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    height, width = frames[0].shape[:2]
    is_colour = frames[0].ndim == 3
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), is_colour
    )
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def hamilton_frame(index: int = 30) -> np.ndarray:
    capture = cv2.VideoCapture(str(require(HAMILTON)))
    capture.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, image = capture.read()
    capture.release()
    assert ok
    return image


class SilentServer:
    """A local TCP server that accepts connections and never answers (a hung camera)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


# ---- fatal: one error line, non-zero exit ---------------------------------------------


def _missing_file(tmp: Path) -> list[str]:
    return ["run", str(tmp / "missing.mp4")]


def _corrupt_file(tmp: Path) -> list[str]:
    path = tmp / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(64_000))
    return ["run", str(path)]


def _unreachable_url(tmp: Path) -> list[str]:
    return ["run", "rtsp://user:secret@127.0.0.1:9/cam"]


def _unknown_config_key(tmp: Path) -> list[str]:
    config = tmp / "c.yaml"
    config.write_text("source:\n  queue_sise: 4\n")
    return ["run", str(require(HAMILTON)), "--config", str(config)]


def _blazeface_cache(tmp: Path, corrupt: bool) -> list[str]:
    models = tmp / "models"
    models.mkdir()
    if corrupt:
        (models / "face_detection_short_range.tflite").write_bytes(b"not a model" * 100)
    return ["run", str(require(HAMILTON)), "--detector", "short", "--models-dir", str(models)]


# Fetching a missing or corrupt cached model must fail here: a refusing local proxy.
NO_NETWORK = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "2",
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
}


@pytest.mark.parametrize(
    ("make_args", "env", "exit_code", "expected"),
    [
        (_missing_file, None, 1, "agestream: error: video file not found"),
        (_corrupt_file, None, 1, "agestream: error: cannot open video source"),
        (_unreachable_url, None, 1, "agestream: error: cannot open video source rtsp://***@"),
        (_unknown_config_key, None, 2, "agestream: config error:"),
        (
            lambda tmp: _blazeface_cache(tmp, False),
            NO_NETWORK,
            1,
            "could not fetch blazeface-short",
        ),
        (lambda tmp: _blazeface_cache(tmp, True), NO_NETWORK, 1, "could not fetch blazeface-short"),
    ],
    ids=[
        "missing file",
        "corrupt file",
        "unreachable url",
        "unknown config key",
        "missing model, fetch fails",
        "corrupt model, fetch fails",
    ],
)
def test_given_fatal_bad_input_when_run_then_one_error_line_and_exit_code(
    tmp_path: Path, make_args, env, exit_code: int, expected: str
) -> None:
    done = agestream(*make_args(tmp_path), "--no-window", env=env)

    assert done.returncode == exit_code, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("agestream:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "secret" not in done.stderr


def test_given_url_that_never_answers_when_run_then_times_out_with_one_error_line(
    tmp_path: Path,
) -> None:
    server = SilentServer()
    config = tmp_path / "c.yaml"
    config.write_text("source:\n  open_timeout_s: 1.0\n  read_timeout_s: 1.0\n")
    try:
        done = agestream(
            "run", f"rtsp://127.0.0.1:{server.port}/cam", "--config", str(config), "--no-window"
        )
    finally:
        server.close()

    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("agestream:")]
    assert len(errors) == 1 and "cannot open video source" in errors[0], done.stderr


# ---- per frame: handled, every frame written ------------------------------------------


def _grey_video(tmp: Path) -> Path:
    grey = cv2.cvtColor(hamilton_frame(), cv2.COLOR_BGR2GRAY)
    return write_video(tmp / "grey.mp4", [grey] * 6)


def _uhd_video(tmp: Path) -> Path:
    uhd = cv2.resize(hamilton_frame(), (3840, 2160))
    return write_video(tmp / "uhd.mp4", [uhd] * 3)


def _no_faces_video(tmp: Path) -> Path:
    rng = np.random.default_rng(1)
    return write_video(
        tmp / "noise.mp4", [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(6)]
    )


def _face_cut_by_edge_video(tmp: Path) -> Path:
    image = hamilton_frame()
    # Shift the picture so that the performer's face straddles the left edge.
    faces = _detect(image)
    assert len(faces), "the chosen frame shows a face"
    x1, _, x2, _ = faces[0]
    shift = int((x1 + x2) / 2)
    shifted = np.zeros_like(image)
    shifted[:, : image.shape[1] - shift] = image[:, shift:]
    return write_video(tmp / "edge.mp4", [shifted] * 6)


def _detect(image: np.ndarray) -> np.ndarray:
    from detectors import create_detector
    from stream.config import DetectorConfig

    with create_detector(DetectorConfig(model="short"), image.shape[1]) as detector:
        return detector.detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).xyxy


@pytest.mark.parametrize(
    ("make_video", "frames", "min_faces"),
    [
        (_grey_video, 6, 6),
        (_uhd_video, 3, 3),
        (_no_faces_video, 6, 0),
        (_face_cut_by_edge_video, 6, 0),
    ],
    ids=["greyscale frames", "4K frames", "zero faces", "face cut by the frame edge"],
)
def test_given_awkward_frames_when_run_then_every_frame_is_written(
    tmp_path: Path, make_video, frames: int, min_faces: int
) -> None:
    video, jsonl = tmp_path / "o.mp4", tmp_path / "o.jsonl"
    done = agestream(
        "run",
        str(make_video(tmp_path)),
        "--no-window",
        "--output",
        str(video),
        "--json",
        str(jsonl),
    )

    assert done.returncode == 0, done.stderr
    records = frame_records(jsonl)
    assert [record["frame"] for record in records] == list(range(frames))
    assert sum(len(record["faces"]) for record in records) >= min_faces
    for face in (face for record in records for face in record["faces"]):
        if face["track"] is not None:
            assert 0 <= face["age"] <= 100 and face["gender"] in ("male", "female", "unsure")
    assert "frames skipped after errors" not in done.stderr
    assert f"{frames} frames in " in done.stderr


# ---- the analyzer on arrays no source produces ----------------------------------------


@pytest.fixture(scope="module")
def analyzer():
    from detectors import create_detector
    from estimators import create_estimator
    from stream.analyzer import FaceAnalyzer
    from stream.config import Config

    config = Config()
    with create_detector(config.detector, 640) as detector:
        yield FaceAnalyzer(detector, create_estimator(config.estimator))


def test_given_bgra_image_when_analyzed_then_alpha_is_dropped_and_faces_found(analyzer) -> None:
    bgra = cv2.cvtColor(hamilton_frame(), cv2.COLOR_BGR2BGRA)

    faces, estimates, *_ = analyzer.analyze(bgra)

    assert len(faces) >= 1 and len(estimates) == len(faces)


def test_given_single_channel_image_when_analyzed_then_converted_and_faces_found(
    analyzer,
) -> None:
    # Sources always decode to 3 channels; a (H, W) array can only come from an API
    # caller, and OpenCV's colour conversion expands it like a grey BGR frame.
    grey = cv2.cvtColor(hamilton_frame(), cv2.COLOR_BGR2GRAY)

    faces, estimates, *_ = analyzer.analyze(grey)
    grey_bgr_faces, *_ = analyzer.analyze(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))

    assert len(faces) >= 1 and len(estimates) == len(faces)
    np.testing.assert_allclose(faces.xyxy, grey_bgr_faces.xyxy)
