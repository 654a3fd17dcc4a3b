"""One person per track: a shot cut ends every track, a face whose identity disagrees with its
track's starts a new one, confirmation waits for the face's identity, and a person who comes
back is recognised by their face, never by their clothes alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stream.appearance import Identities
from stream.cuts import CutDetector, face_looks, scene_change, scene_signature
from stream.tracking import Tracker, identity_distance
from stream.types import Faces
from tests.conftest import HAMILTON, VIDEOS, require

BOX = (100.0, 100.0, 180.0, 180.0)


def faces_at(*boxes: tuple[float, float, float, float]) -> Faces:
    n = len(boxes)
    return Faces(
        np.array(boxes, np.float32).reshape(n, 4),
        np.full(n, 0.9, np.float32),
        np.zeros((n, 6, 2), np.float32),
    )


def person(index: int) -> np.ndarray:
    """A unit face descriptor per person: orthogonal, so distance sqrt(2) between people."""
    return np.eye(1, 128, index, np.float32)[0]


class FaceShown:
    """The identity callback of a scene whose face belongs to `who` (None: unusable view),
    counting the faces it was asked about."""

    def __init__(self) -> None:
        self.who: int | None = 0
        self.asked = 0

    def __call__(self, faces: Faces) -> np.ndarray:
        self.asked += len(faces)
        if self.who is None:
            return np.full((len(faces), 128), np.nan, np.float32)
        return np.tile(person(self.who), (len(faces), 1))


def tracker(**kwargs: object) -> Tracker:
    settings = {"min_hits": 3, "identity_distance": 0.6, "identity_every": 15} | kwargs
    return Tracker(30.0, **settings)  # type: ignore[arg-type]


def test_given_a_cut_then_every_track_ends_and_the_face_starts_a_new_unconfirmed_one() -> None:
    tracks, faces = tracker(), FaceShown()
    for _ in range(5):
        before = tracks.update(faces_at(BOX), face_identity=faces)
    after = tracks.update(faces_at(BOX), face_identity=faces, cut=True)
    assert after.cut and after.ended == (int(before.track_ids[0]),)
    assert after.track_ids[0] != before.track_ids[0] and not after.confirmed[0]


def test_given_another_face_at_the_same_place_after_a_miss_then_the_track_is_split() -> None:
    tracks, faces = tracker(), FaceShown()
    first = [tracks.update(faces_at(BOX), face_identity=faces) for _ in range(5)][-1]
    tracks.update(Faces.empty(), face_identity=faces)  # one frame without a face
    faces.who = 1
    doubted = tracks.update(faces_at(BOX), face_identity=faces)
    assert doubted.track_ids[0] == first.track_ids[0] and not doubted.split
    assert not doubted.confirmed[0], "a face in doubt shows no one's label"
    replaced = tracks.update(faces_at(BOX), face_identity=faces)
    assert replaced.split == (int(first.track_ids[0]),) == replaced.ended
    assert replaced.track_ids[0] != first.track_ids[0]
    assert not replaced.confirmed[0], "someone else until seen enough: no label carried over"
    shown = [tracks.update(faces_at(BOX), face_identity=faces) for _ in range(2)][-1]
    assert shown.confirmed[0] and shown.track_ids[0] == replaced.track_ids[0]
    assert identity_distance(shown.signatures[0], person(1)[None])[0] < 1e-6


def test_given_the_same_face_then_checks_run_every_identity_every_frames_and_never_split() -> None:
    tracks, faces = tracker(identity_every=10), FaceShown()
    updates = [tracks.update(faces_at(BOX), face_identity=faces) for _ in range(63)]
    assert {int(u.track_ids[0]) for u in updates} == {1} and not any(u.ended for u in updates)
    # Once when the track is ready (third frame), then every 10 frames.
    assert faces.asked == 1 + (63 - 3) // 10


def test_given_a_face_swapped_without_a_miss_then_the_next_periodic_check_splits_it() -> None:
    tracks, faces = tracker(identity_every=10), FaceShown()
    for _ in range(12):
        tracks.update(faces_at(BOX), face_identity=faces)
    faces.who = 1
    updates = [tracks.update(faces_at(BOX), face_identity=faces) for _ in range(11)]
    assert sum(bool(u.split) for u in updates) == 1


class OneOddView(FaceShown):
    """Person 0's face, once seen as another's (a hand or a microphone over it)."""

    def __init__(self, odd_call: int) -> None:
        super().__init__()
        self.calls, self.odd_call = 0, odd_call

    def __call__(self, faces: Faces) -> np.ndarray:
        self.calls += 1
        self.who = 1 if self.calls == self.odd_call else 0
        return super().__call__(faces)


def test_given_one_odd_view_then_the_track_goes_on_and_is_hidden_for_that_frame_only() -> None:
    tracks, faces = tracker(identity_every=10), OneOddView(odd_call=3)
    updates = [tracks.update(faces_at(BOX), face_identity=faces) for _ in range(40)]
    assert {int(u.track_ids[0]) for u in updates} == {1} and not any(u.ended for u in updates)
    assert sum(not u.confirmed[0] for u in updates[2:]) == 1


def test_given_no_usable_view_then_confirmation_waits_identity_wait_frames() -> None:
    tracks, faces = tracker(identity_wait=6), FaceShown()
    faces.who = None
    confirmed = [
        bool(tracks.update(faces_at(BOX), face_identity=faces).confirmed[0]) for _ in range(12)
    ]
    assert confirmed.index(True) == 2 + 6, "ready on the third detection, then waits 6 frames"


def test_given_identity_off_then_hits_alone_confirm() -> None:
    tracks, faces = tracker(identity_distance=0.0), FaceShown()
    updates = [tracks.update(faces_at(BOX), face_identity=faces) for _ in range(3)]
    assert updates[2].confirmed[0] and faces.asked == 0
    assert updates[2].signatures.shape == (1, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"identity_distance": 2.5}, "identity_distance must be in"),
        ({"identity_every": 0}, "identity_every must be >= 1"),
    ],
)
def test_given_bad_identity_settings_then_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tracker(30.0, **kwargs)


def identities_update(identities: Identities, track: int, face: np.ndarray) -> int:
    image = np.full((300, 300, 3), 120, np.uint8)  # everyone "dressed alike": same colours
    box = np.array([[100, 50, 160, 110]], np.float32)
    update = identities.update(image, box, np.array([track]), np.array([True]), face[None])
    return int(update.person_ids[0])


def test_given_people_dressed_alike_then_only_a_matching_face_comes_back_as_the_same() -> None:
    identities = Identities(reid_s=30.0, reid_distance=0.5, similarity=0.9)
    first = identities_update(identities, 1, person(0))
    identities.end({1: None}, now_s=1.0)
    assert identities_update(identities, 2, person(1)) != first, "same clothes, another face"
    identities.end({2: None}, now_s=2.0)
    assert identities_update(identities, 3, person(0)) == first, "their face: the same person"


def test_given_a_track_without_a_face_signature_then_it_is_a_new_person() -> None:
    identities = Identities(reid_s=30.0, reid_distance=0.5, similarity=0.9)
    first = identities_update(identities, 1, person(0))
    identities.end({1: None}, now_s=1.0)
    unknown = np.full(128, np.nan, np.float32)
    assert identities_update(identities, 2, unknown) != first


def shot_changes(path: str) -> list[int]:
    capture, cuts, index = cv2.VideoCapture(path), CutDetector(0.08), 0
    found = []
    while True:
        ok, image = capture.read()
        if not ok:
            return found
        if cuts.update(scene_signature(image)):
            found.append(index)
        index += 1


def test_given_the_shared_clips_then_cuts_are_found_where_the_shots_change_and_nowhere_else() -> (
    None
):
    assert shot_changes(str(require(HAMILTON))) == [20, 82, 211]
    for name in ("d3", "d10", "d13", "d19"):
        assert shot_changes(str(VIDEOS / f"livePortrait__driving__{name}.mp4")) == [], name
    for name in ("s18", "s32"):
        assert shot_changes(str(VIDEOS / f"livePortrait__source__{name}.mp4")) == [], name


def test_given_camera_motion_and_light_changes_then_no_cut() -> None:
    capture = cv2.VideoCapture(str(require(VIDEOS / "livePortrait__source__s32.mp4")))
    frames = [capture.read()[1] for _ in range(40)]
    pan = [frame[:360, 15 * i : 15 * i + 640] for i, frame in enumerate(frames)]
    zoom = [
        cv2.resize(frame[3 * i : 720 - 3 * i, 5 * i : 1280 - 5 * i], (640, 360))
        for i, frame in enumerate(frames)
    ]
    lights_dimmed = [
        (frame * (0.3 if i >= 20 else 1.0)).astype(np.uint8) for i, frame in enumerate(frames)
    ]
    for name, clip in (("pan", pan), ("zoom", zoom), ("light", lights_dimmed)):
        signatures = [scene_signature(image) for image in clip]
        worst = max(scene_change(a, b) for a, b in zip(signatures, signatures[1:]))
        assert worst < 0.05, (name, worst)


def test_given_a_bad_cut_threshold_then_value_error() -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        CutDetector(1.0)


def test_given_a_face_box_that_is_a_sliver_at_the_frame_edge_then_it_still_has_a_look() -> None:
    image = np.full((720, 1280, 3), (40, 90, 200), np.uint8)
    looks = face_looks(image, np.array([[1278.0, 100.0, 1400.0, 300.0], [0, 0, 30, 2]]))
    assert looks.shape == (2, 36)
    assert np.allclose(np.linalg.norm(looks, axis=1), 1.0), "one colour each, whole"
