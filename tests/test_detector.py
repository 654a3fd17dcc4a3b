from __future__ import annotations

import cv2
import numpy as np
import pytest

from detectors import create_detector
from detectors.mediapipe import resolve_model
from stream.config import DetectorConfig
from tests.conftest import VIDEOS, require


def first_frame_rgb(name: str) -> np.ndarray:
    capture = cv2.VideoCapture(str(require(VIDEOS / name)))
    ok, frame = capture.read()
    capture.release()
    assert ok
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("model", "width", "expected"),
    [
        ("auto", 1280, "full"),
        ("auto", 640, "short"),
        ("short", 1920, "short"),
        ("full", 320, "full"),
    ],
)
def test_given_model_setting_and_width_then_variant(model: str, width: int, expected: str) -> None:
    assert resolve_model(model, width, auto_full_range_width=640) == expected


@pytest.fixture(scope="module")
def small_face_frame() -> np.ndarray:
    """A 1280x720 frame holding one face about 95 px wide: the s18 clip shrunk onto a canvas."""
    frame = first_frame_rgb("livePortrait__source__s18.mp4")  # face box 257 px at full size
    small = cv2.resize(frame, None, fx=0.37, fy=0.37, interpolation=cv2.INTER_AREA)
    canvas = np.full((720, 1280, 3), 127, np.uint8)
    canvas[200 : 200 + small.shape[0], 300 : 300 + small.shape[1]] = small
    return canvas


def test_given_small_face_in_hd_frame_then_full_range_finds_it_and_short_range_misses(
    small_face_frame: np.ndarray,
) -> None:
    with create_detector(DetectorConfig(model="full"), 1280) as full:
        found = full.detect(small_face_frame)
    with create_detector(DetectorConfig(model="short"), 1280) as short:
        missed = short.detect(small_face_frame)
    assert len(found) == 1
    width = found.xyxy[0, 2] - found.xyxy[0, 0]
    assert 80 <= width <= 110
    assert len(missed) == 0


def test_given_real_face_then_keypoints_lie_inside_box_in_mediapipe_order() -> None:
    frame = first_frame_rgb("livePortrait__driving__d3.mp4")
    with create_detector(DetectorConfig(), frame.shape[1]) as detector:
        faces = detector.detect(frame)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces.xyxy[0]
    eyes_mouth = faces.keypoints[0, :4]
    assert np.all((eyes_mouth[:, 0] > x1) & (eyes_mouth[:, 0] < x2))
    assert np.all((eyes_mouth[:, 1] > y1) & (eyes_mouth[:, 1] < y2))
    right_eye, left_eye, _, mouth = eyes_mouth
    assert right_eye[0] < left_eye[0], "the person's right eye is on the image's left"
    assert mouth[1] > max(right_eye[1], left_eye[1])


def test_given_min_face_px_above_face_size_then_face_is_dropped() -> None:
    frame = first_frame_rgb("livePortrait__driving__d3.mp4")
    with create_detector(DetectorConfig(min_face_px=2000), frame.shape[1]) as detector:
        assert len(detector.detect(frame)) == 0


def test_given_blank_frame_then_no_faces() -> None:
    with create_detector(DetectorConfig(), 640) as detector:
        faces = detector.detect(np.zeros((360, 640, 3), np.uint8))
    assert len(faces) == 0 and faces.keypoints.shape == (0, 6, 2)
