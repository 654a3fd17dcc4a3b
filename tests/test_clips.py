"""The made clips say what their truth says: who is where, cuts where a box tracker would
carry one id across, a queue whose background never changes, two people dressed alike."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detectors import create_detector
from stream.config import DetectorConfig
from tests.clips import (
    HAMILTON,
    Appearance,
    Truth,
    _frames,
    cuts_clip,
    dressed_alike_clip,
    grid_truth,
    leave_and_return_truth,
    queue_clip,
    shared_truth,
)
from tests.conftest import UTKFACE, VIDEOS, require


def iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def faces_in(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The boxes the pipeline's own detector (auto, at the clip's width) finds per frame."""
    with create_detector(DetectorConfig(), frames[0].shape[1]) as detector:
        return [detector.detect(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)).xyxy for f in frames]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[np.ndarray], Truth]]:
    require(VIDEOS)
    require(UTKFACE)
    folder = tmp_path_factory.mktemp("who")
    built = {}
    for build in (cuts_clip, queue_clip, dressed_alike_clip):
        path, truth = build(VIDEOS, UTKFACE, folder / f"{build.__name__}.mp4")
        built[build.__name__] = (_frames(path), truth)
    return built


def test_given_regions_then_a_face_belongs_to_whoever_is_there_then() -> None:
    truth = Truth(
        (
            Appearance("left", 0, 9, (0, 0, 100, 100)),
            Appearance("right", 0, 19, (100, 0, 200, 100)),
            Appearance("child", 20, 29, None, age=4),
        )
    )
    assert truth.person_at(5, (10, 10, 50, 50)) == "left"
    assert truth.person_at(15, (10, 10, 50, 50)) is None, "left has gone"
    assert truth.person_at(15, (120, 10, 160, 50)) == "right"
    assert truth.person_at(25, (500, 500, 600, 600)) == "child"
    assert truth.people == ("left", "right", "child") and truth.age_of("child") == 4
    assert Truth((), count_only=True, count=3).person_at(0, (0, 0, 1, 1)) is None


def test_given_shared_clips_then_hamilton_has_five_people_and_grids_keep_cells() -> None:
    hamilton = require(VIDEOS / f"{HAMILTON}.mp4")
    assert len(shared_truth(hamilton).people) == 5
    assert shared_truth(hamilton).person_at(150, (200, 50, 300, 150)) == "hamilton:performer"
    d3, s32 = VIDEOS / "livePortrait__driving__d3.mp4", VIDEOS / "livePortrait__source__s32.mp4"
    grid = grid_truth([d3, s32])
    assert grid.person_at(10, (280, 140, 360, 220)) == "d3"
    assert grid.person_at(10, (920, 140, 1000, 220)) == "s32"
    assert grid.person_at(500, (280, 140, 360, 220)) is None, "past the shorter clip's end"
    back = leave_and_return_truth(VIDEOS / "livePortrait__driving__d19.mp4")
    assert back.people == ("d19",) and len(back.appearances) == 2


def test_given_the_cuts_clip_then_one_face_a_frame_lined_up_across_every_cut(made) -> None:
    frames, truth = made["cuts_clip"]
    assert len(frames) == truth.appearances[-1].last_frame + 1 and frames[0].shape == (480, 640, 3)
    assert len(truth.people) == 7 and truth.appearances[0].person == truth.appearances[-1].person
    child = truth.appearances[-2]
    assert child.age is not None and child.age < 13, "the child right after the last adult"
    cuts = [a.first_frame for a in truth.appearances[1:]]
    around = [i for cut in cuts for i in (cut - 1, cut)]
    boxes = faces_in([frames[i] for i in around])
    assert all(len(found) == 1 for found in boxes)
    for before, after in zip(boxes[::2], boxes[1::2]):
        assert iou(before[0], after[0]) > 0.4, "a box tracker would carry its id across"


def test_given_the_queue_then_gaps_of_0_5_15_frames_and_only_faces_change(made) -> None:
    frames, truth = made["queue_clip"]
    spans = truth.appearances
    assert [b.first_frame - a.last_frame - 1 for a, b in zip(spans, spans[1:])] == [0, 5, 15]
    assert len(truth.people) == 4 and all(a.age >= 18 for a in spans)
    found = faces_in([frames[a.first_frame] for a in spans])
    assert all(len(boxes) == 1 and 120 <= boxes[0][2] - boxes[0][0] <= 170 for boxes in found)
    before, after = (
        frames[i].astype(np.int16) for i in (spans[0].last_frame, spans[1].first_frame)
    )
    outside = np.ones(before.shape[:2], bool)
    outside[100:320, 200:440] = False  # the face and its drift
    assert np.abs(before - after)[outside].mean() < 6, "noise only: no cut to detect"


def test_given_dressed_alike_then_two_people_at_one_place_2_s_apart(made) -> None:
    frames, truth = made["dressed_alike_clip"]
    first, second = truth.appearances
    assert first.person != second.person and second.first_frame - first.last_frame - 1 == 60
    found = faces_in([frames[i] for i in (first.first_frame, 90, second.first_frame)])
    assert len(found[0]) == 1 and len(found[1]) == 0 and len(found[2]) == 1
    assert iou(found[0][0], found[2][0]) > 0.6
