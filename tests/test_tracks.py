"""Fewer, truer tracks: confirmation by a second look, no labelled false faces on footage
without faces, few short tracks, and one identity for a person who leaves and comes back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream.appearance import Identities, appearance
from stream.config import TrackingConfig
from stream.processor import FrameProcessor
from stream.tracking import Tracker
from stream.types import Estimates, Faces, Frame
from tests.conftest import HAMILTON, face_records, run_json_lines

BOX = np.array([[100, 100, 160, 160]], np.float32)


def faces_at(box: np.ndarray) -> Faces:
    return Faces(box, np.array([0.8], np.float32), np.zeros((1, 6, 2), np.float32))


def confirmed_after(likeness: list[float], score: float = 0.65) -> int | None:
    """The frame at which a still face with these second-look scores is confirmed."""
    tracker = Tracker(30.0, min_hits=3, face_check_score=score)
    for frame, value in enumerate(likeness):
        update = tracker.update(faces_at(BOX), lambda f: np.full(len(f), value, np.float32))
        if update.confirmed[0]:
            return frame
    return None


def test_given_a_clear_face_then_its_track_is_confirmed_on_the_third_detection() -> None:
    assert confirmed_after([0.9] * 10) == 2


def test_given_a_lasting_false_detection_then_it_is_never_confirmed() -> None:
    assert confirmed_after([0.5] * 300) is None


def test_given_a_false_detection_with_lucky_scores_now_and_then_it_is_not_confirmed() -> None:
    assert confirmed_after(([0.55] * 4 + [0.95]) * 60) is None


def test_given_no_face_check_then_hits_alone_confirm() -> None:
    assert confirmed_after([0.0] * 5, score=0.0) == 2


def test_given_a_bad_face_check_score_then_value_error() -> None:
    with pytest.raises(ValueError, match="face_check_score must be in"):
        Tracker(30.0, face_check_score=1.5)


def test_given_footage_without_faces_then_at_most_one_labelled_false_face_a_minute(
    clip_runs: dict[str, list[dict]],
) -> None:
    records = clip_runs["no_face"]
    minutes = records[-1]["t_ms"] / 60_000
    assert minutes > 0.75, "enough footage to measure a rate"
    people = {face["track"] for _, face in face_records(records) if face["track"] is not None}
    detections = len(face_records(records))
    assert detections > 20, "the footage does fool the detector now and then"
    assert len(people) <= max(minutes, 1.0)


def track_durations(records: list[dict], fps: float) -> dict[int, float]:
    spans: dict[int, list[float]] = {}
    for t_ms, face in face_records(records):
        if face["track"] is not None:
            spans.setdefault(face["track"], [t_ms, t_ms])[1] = t_ms
    return {track: (last - first) / 1000 + 1 / fps for track, (first, last) in spans.items()}


def test_given_every_clip_then_tracks_shorter_than_a_second_are_rare(
    clip_runs: dict[str, list[dict]],
) -> None:
    for name, records in clip_runs.items():
        if name == "no_face":
            continue
        durations = track_durations(records, records[0]["fps"])
        short = sum(d < 1.0 for d in durations.values())
        if name == HAMILTON.stem:
            # The pianist in profile between two cuts, on screen for 0.97 s (shown 0.7 s: his
            # track waits for a view of his face that tells who he is): a real person, and
            # the only short track of the clip's five.
            assert short <= 1 and len(durations) <= 6, durations
        else:
            assert short <= 0.1 * len(durations), (name, durations)


def test_given_four_people_at_once_then_four_identities(
    clip_runs: dict[str, list[dict]],
) -> None:
    records = clip_runs["grid"]
    seen_together = max(
        len({f["track"] for f in r["faces"] if f["track"] is not None})
        for r in records
        if "faces" in r
    )
    people = {face["track"] for _, face in face_records(records) if face["track"] is not None}
    assert seen_together == 4
    assert len(people) <= 5, "the Hamilton cell cuts between shots"


def test_given_a_person_who_leaves_and_returns_then_one_identity_where_the_tracker_gives_two(
    clip_runs: dict[str, list[dict]], made_clips: dict[str, Path], tmp_path: Path
) -> None:
    with_reid = clip_runs["leave_return"]
    no_reid_config = tmp_path / "no-reid.yaml"
    no_reid_config.write_text("tracking:\n  reid_s: 0.0\n")
    tracker_alone = run_json_lines(made_clips["leave_return"], tmp_path / "t.jsonl", no_reid_config)
    ids = [
        {face["track"] for _, face in face_records(records) if face["track"] is not None}
        for records in (with_reid, tracker_alone)
    ]
    assert len(ids[0]) == 1 and len(ids[1]) == 2


def test_given_two_looks_then_appearance_similarity_tells_people_apart() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((400, 600, 3), np.uint8)
    image[:, :300] = (40, 60, 200)  # a person in red
    image[:, 300:] = (200, 120, 30)  # and one in blue
    image += rng.integers(0, 20, image.shape, dtype=np.uint8)
    looks = appearance(image, np.array([[100, 50, 180, 130], [400, 50, 480, 130]], np.float32))
    assert looks[0] @ looks[0] == pytest.approx(1.0, abs=1e-5)
    assert looks[0] @ looks[1] < 0.5


FACE = np.eye(1, 128, 0, np.float32)  # one person's unit face signature


def test_given_a_person_away_longer_than_reid_s_then_a_new_identity() -> None:
    identities = Identities(reid_s=2.0, reid_distance=0.5, similarity=0.9)
    image = np.full((300, 300, 3), 120, np.uint8)
    box, one = np.array([[100, 50, 160, 110]], np.float32), np.array([True])
    first = identities.update(image, box, np.array([1]), one, FACE).person_ids[0]
    assert identities.end({1: "evidence"}, now_s=1.0) == []
    back = identities.update(image, box, np.array([2]), one, FACE)
    assert back.person_ids[0] == first and back.returned == ((2, "evidence"),)
    assert identities.end({2: "evidence"}, now_s=3.0) == []
    assert identities.end({}, now_s=5.5) == [first], "gone for good after reid_s"
    assert identities.update(image, box, np.array([3]), one, FACE).person_ids[0] != first


class FailingEstimates:
    """An analyzer whose face is always at BOX (until `gone_from`) and whose estimator fails
    from frame `fail_from` on, as a shared batcher's timeout would."""

    embedder = None  # no identity checks

    def __init__(self, fail_from: int, gone_from: int) -> None:
        self.fail_from, self.gone_from, self.frame = fail_from, gone_from, 0

    def detect(self, image_bgr: np.ndarray, timings: dict) -> tuple[np.ndarray, Faces]:
        self.frame += 1
        faces = faces_at(BOX) if self.frame <= self.gone_from else Faces.empty()
        return image_bgr, faces

    def face_likeness(self, image_rgb: np.ndarray, faces: Faces) -> np.ndarray:
        return np.ones(len(faces), np.float32)

    def estimate(self, image_rgb: np.ndarray, faces: Faces, timings: dict) -> Estimates:
        if self.frame > self.fail_from:
            raise TimeoutError("the batcher did not answer in time")
        n = len(faces)
        return Estimates(*(np.full(n, value, np.float32) for value in (30.0, 0.95, 0.5)))


def test_given_the_estimator_fails_then_frames_keep_their_faces_and_people_still_end() -> None:
    tracking = TrackingConfig(lifetime_s=0.1, reid_s=0.2)
    processor = FrameProcessor(FailingEstimates(fail_from=5, gone_from=8), tracking, fps=10.0)
    image = np.full((300, 300, 3), 120, np.uint8)
    results = [processor.process(Frame(image, i, i / 10, "t"), i * 100.0) for i in range(20)]
    during = results[6][0]  # the estimator fails, the face is there
    assert len(during.faces) == 1 and during.track_ids.tolist() == [1]
    assert during.smoothed.age[0] == pytest.approx(30.0), "the label so far stays"
    assert not during.estimated.any()
    assert [gone for _, gone in results if gone] == [[1]], "the person's row is still due"


def test_given_reid_s_zero_then_a_person_who_left_never_comes_back_as_themselves() -> None:
    identities = Identities(reid_s=0.0, reid_distance=0.5, similarity=0.9)
    image = np.full((300, 300, 3), 120, np.uint8)
    box, one = np.array([[100, 50, 160, 110]], np.float32), np.array([True])
    first = identities.update(image, box, np.array([1]), one, FACE).person_ids[0]
    assert identities.end({1: "evidence"}, now_s=1.0) == [first], "gone at once"
    back = identities.update(image, box, np.array([2]), one, FACE)
    assert back.person_ids[0] != first and back.returned == ()
