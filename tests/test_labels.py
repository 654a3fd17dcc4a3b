"""The label a user sees never contradicts its numbers, and stays readable: on every shared
clip and the clips made from them, and for label placement at the frame's edges."""

from __future__ import annotations

import numpy as np
import pytest

from stream.overlay import face_label, place_label
from tests.conftest import face_records


def test_given_every_clip_then_no_record_shows_a_gender_its_p_male_contradicts(
    clip_runs: dict[str, list[dict]],
) -> None:
    checked = 0
    for name, records in clip_runs.items():
        for _, face in face_records(records):
            gender, p_male = face["gender"], face["p_male"]
            if face["track"] is None:
                assert gender is None and p_male is None, f"{name}: unconfirmed face labelled"
                continue
            assert gender in ("male", "female", "unsure"), name
            assert gender != "male" or p_male > 0.5, f"{name}: male with p_male {p_male}"
            assert gender != "female" or p_male < 0.5, f"{name}: female with p_male {p_male}"
            checked += 1
    assert checked > 3000, "every shared clip has faces to check"


def test_given_every_clip_then_no_gender_is_shown_for_a_child_or_near_even_odds(
    clip_runs: dict[str, list[dict]],
) -> None:
    for records in clip_runs.values():
        for _, face in face_records(records):
            if face["track"] is not None and face["gender"] in ("male", "female"):
                assert face["age"] >= 10
                assert abs(face["p_male"] - 0.5) >= 0.2


def test_given_labels_then_unsure_shows_no_percentage_and_decided_ones_do() -> None:
    assert face_label(34.2, 0.62, "unsure", (27.6, 41.4)) == "? 28-41"
    assert face_label(34.2, 0.9, "male") == "M 34 (90%)", "no range: the age alone"
    assert face_label(6.0, 0.1, "female", (4.2, 8.9)) == "F 4-9 (90%)"
    assert face_label(40.0, float("nan"), None, (33.0, 48.0)) == "33-48"


FRAME = (640, 360)


def inside(box: tuple[int, int, int, int]) -> bool:
    return 0 <= box[0] and 0 <= box[1] and box[2] <= FRAME[0] and box[3] <= FRAME[1]


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


@pytest.mark.parametrize(
    "face",
    [(600, 100, 660, 160), (-20, -10, 60, 70), (300, 320, 360, 380), (0, 0, 640, 360)],
    ids=["right edge", "top left corner", "bottom edge", "fills the frame"],
)
def test_given_a_face_at_the_edge_then_its_label_stays_inside_the_frame(face: tuple) -> None:
    assert inside(place_label((150, 24), face, FRAME, []))


def test_given_a_face_below_another_then_its_label_does_not_cover_that_face() -> None:
    upper, lower = (200, 40, 280, 120), (200, 124, 280, 204)
    label = place_label((150, 24), lower, FRAME, [upper])
    assert not overlaps(label, upper) and inside(label)
    assert label[1] >= lower[3], "below its face, where nothing else is"


def test_given_two_faces_side_by_side_then_labels_cover_neither_box_nor_each_other() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = int(rng.integers(0, 400)), int(rng.integers(40, 250))
        left, right = (x, y, x + 60, y + 60), (x + 70, y, x + 130, y + 60)
        first = place_label((60, 20), left, FRAME, [left, right])
        second = place_label((60, 20), right, FRAME, [left, right, first])
        assert inside(first) and inside(second)
        for label in (first, second):
            assert not overlaps(label, left) and not overlaps(label, right)
        assert not overlaps(first, second)
