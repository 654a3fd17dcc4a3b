from __future__ import annotations

import numpy as np
import pytest

from stream.tracking import Tracker, iou_matrix
from stream.types import Faces


def faces_at(*boxes: tuple[float, float, float, float]) -> Faces:
    n = len(boxes)
    return Faces(
        xyxy=np.array(boxes, np.float32).reshape(n, 4),
        score=np.full(n, 0.9, np.float32),
        keypoints=np.zeros((n, 6, 2), np.float32),
    )


def test_given_boxes_then_iou_is_overlap_over_union() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(iou_matrix(a, b), [[50 / 150, 0.0]])


def test_given_a_face_moving_slowly_then_it_keeps_one_id_and_is_confirmed_after_min_hits() -> None:
    tracker = Tracker(fps=30, min_hits=3)
    updates = [tracker.update(faces_at((100 + 3 * t, 50, 180 + 3 * t, 130))) for t in range(30)]
    assert {int(u.track_ids[0]) for u in updates} == {1}
    assert [bool(u.confirmed[0]) for u in updates[:4]] == [False, False, True, True]


def test_given_two_faces_then_each_keeps_its_own_id_whatever_the_detection_order() -> None:
    tracker = Tracker(fps=30)
    left, right = (10, 10, 60, 60), (200, 10, 250, 60)
    first = tracker.update(faces_at(left, right)).track_ids
    swapped = tracker.update(faces_at(right, left)).track_ids
    assert list(swapped) == [first[1], first[0]]


def test_given_a_short_miss_then_the_id_survives_and_a_long_one_ends_the_track() -> None:
    tracker = Tracker(fps=10, lifetime_s=0.5)  # survives 5 missed frames
    box = (100, 100, 150, 150)
    track_id = int(tracker.update(faces_at(box)).track_ids[0])
    for _ in range(5):
        assert tracker.update(Faces.empty()).ended == ()
    assert int(tracker.update(faces_at(box)).track_ids[0]) == track_id
    ended = [tracker.update(Faces.empty()).ended for _ in range(6)]
    assert ended[-1] == (track_id,) and all(e == () for e in ended[:-1])
    assert tracker.update(faces_at(box)).track_ids[0] == track_id + 1, "a new person gets a new id"


def test_given_lifetime_in_seconds_then_frames_scale_with_fps() -> None:
    assert Tracker(fps=30, lifetime_s=1.0).max_missed == 30
    assert Tracker(fps=10, lifetime_s=1.0).max_missed == 10


def test_given_two_trackers_then_ids_are_not_shared() -> None:
    a, b = Tracker(fps=30), Tracker(fps=30)
    assert a.update(faces_at((0, 0, 10, 10))).track_ids[0] == 1
    assert b.update(faces_at((0, 0, 10, 10))).track_ids[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fps": 0}, "fps must be > 0"),
        ({"fps": 30, "lifetime_s": -1}, "lifetime_s must be >= 0"),
        ({"fps": 30, "iou_threshold": 1.5}, "iou_threshold must be in (0, 1)"),
        ({"fps": 30, "min_hits": 0}, "min_hits must be >= 1"),
    ],
)
def test_given_bad_argument_then_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Tracker(**kwargs)
