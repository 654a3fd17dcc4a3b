from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.config import TrackingConfig
from stream.smoothing import GenderRule, TrackSmoother, frontalness, sharpness, view_quality
from stream.types import FEMALE, MALE, NO_GENDER, UNSURE, Estimates, Faces
from tests.conftest import VIDEOS, require

ONE = np.array([1])


def estimates(age: float, p_male: float, confidence: float = 0.2) -> Estimates:
    return Estimates(
        age=np.array([age], np.float32),
        p_male=np.array([p_male], np.float32),
        age_confidence=np.array([confidence], np.float32),
    )


def feed(smoother: TrackSmoother, values: list[tuple[float, float]], quality: float = 0.8) -> None:
    for frame, (age, p_male) in enumerate(values):
        q = np.array([quality], np.float32)
        smoother.observe(ONE)
        smoother.add_estimates(ONE, estimates(age, p_male), q, frame)


def gender_of(smoother: TrackSmoother) -> int:
    return int(smoother.smoothed(ONE).gender[0])


def test_given_a_confident_female_track_then_one_male_frame_does_not_change_the_label() -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    feed(smoother, [(30, 0.1)] * 10 + [(30, 0.99)])
    assert gender_of(smoother) == FEMALE


def test_given_sustained_contrary_evidence_then_the_label_passes_through_unsure() -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    feed(smoother, [(30, 0.1)] * 5)
    labels = []
    for frame in range(5, 200):
        smoother.observe(ONE)
        smoother.add_estimates(ONE, estimates(30, 0.97), np.array([0.8], np.float32), frame)
        smoothed = smoother.smoothed(ONE)
        labels.append(int(smoothed.gender[0]))
        p_male = float(smoothed.p_male[0])
        assert labels[-1] != MALE or p_male > 0.5, "a male label never has p_male <= 0.5"
        assert labels[-1] != FEMALE or p_male < 0.5, "a female label never has p_male >= 0.5"
    assert labels[0] == FEMALE and labels[-1] == MALE
    first_male = labels.index(MALE)
    assert UNSURE in labels[:first_male], "no jump from one gender straight to the other"
    assert first_male > 1, "needs more than one frame of evidence"


@pytest.mark.parametrize(
    ("age", "p_male", "quality", "expected"),
    [
        (5.0, 0.97, 0.8, UNSURE),  # a child: gender from the face is unreliable
        (35.0, 0.97, 0.8, MALE),
        (35.0, 0.03, 0.8, FEMALE),
        (35.0, 0.65, 0.8, UNSURE),  # too close to 0.5
        (35.0, 0.97, 0.01, UNSURE),  # ten poor views are too little evidence
    ],
)
def test_given_evidence_then_the_gender_rule_decides_or_stays_unsure(
    age: float, p_male: float, quality: float, expected: int
) -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    feed(smoother, [(age, p_male)] * 10, quality=quality)
    assert gender_of(smoother) == expected


def test_given_a_shown_label_then_it_is_kept_down_to_the_keep_margin() -> None:
    rule = GenderRule(margin=0.3, keep_margin=0.2, min_age=10, min_evidence=0.1)
    assert rule.label(0.75, 30, 1.0, UNSURE) == UNSURE
    assert rule.label(0.75, 30, 1.0, MALE) == MALE
    assert rule.label(0.65, 30, 1.0, MALE) == UNSURE
    assert rule.label(0.35, 30, 1.0, MALE) == UNSURE, "never the other gender's side"
    assert rule.label(float("nan"), 30, 1.0, UNSURE) == NO_GENDER


def test_given_an_age_only_estimator_then_gender_is_none() -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    feed(smoother, [(30, math.nan)] * 3)
    assert gender_of(smoother) == NO_GENDER


def test_given_noisy_ages_then_smoothed_age_is_their_mean_with_a_shrinking_uncertainty() -> None:
    smoother = TrackSmoother(TrackingConfig(half_life_s=1e6), fps=30)
    rng = np.random.default_rng(1)
    ages = 40 + rng.normal(0, 5, 200)
    feed(smoother, [(a, 0.9) for a in ages[:10]])
    early = float(smoother.smoothed(ONE).age_uncertainty[0])
    feed(smoother, [(a, 0.9) for a in ages[10:]])
    smoothed = smoother.smoothed(ONE)
    assert smoothed.age[0] == pytest.approx(ages.mean(), abs=0.01)
    assert smoothed.age_uncertainty[0] == pytest.approx(ages.std() / math.sqrt(200), rel=0.1)
    assert smoothed.age_uncertainty[0] < early


def test_given_one_estimate_then_uncertainty_is_unknown() -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    feed(smoother, [(30, 0.9)])
    assert math.isinf(smoother.smoothed(ONE).age_uncertainty[0])


def test_given_a_good_and_a_poor_view_then_the_good_one_weighs_more() -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    for frame, (age, quality) in enumerate([(20, 0.9), (60, 0.1)]):
        q = np.array([quality], np.float32)
        smoother.observe(ONE)
        smoother.add_estimates(ONE, estimates(age, 0.9), q, frame)
    assert smoother.smoothed(ONE).age[0] == pytest.approx((20 * 0.9 + 60 * 0.1) / 1.0, abs=0.5)


def test_given_settled_track_then_it_is_estimated_only_when_due_or_on_a_better_view() -> None:
    config = TrackingConfig(reestimate_every=10, better_view_ratio=1.25)
    smoother = TrackSmoother(config, fps=30)
    feed(smoother, [(30, 0.05)] * 20, quality=0.5)  # frames 0-19, last estimated at 19
    confirmed = np.array([True])
    same_view = np.array([0.5], np.float32)
    assert not smoother.needs_estimate(ONE, confirmed, same_view, 20)[0]
    assert smoother.needs_estimate(ONE, confirmed, same_view, 29)[0], "due after 10 frames"
    assert smoother.needs_estimate(ONE, confirmed, np.array([0.7], np.float32), 20)[0]
    assert not smoother.needs_estimate(ONE, np.array([False]), same_view, 20)[0], "not shown"
    assert smoother.needs_estimate(np.array([2]), confirmed, same_view, 20)[0], "new track"


def test_given_a_track_ends_then_its_state_is_reset_and_handed_over() -> None:
    smoother = TrackSmoother(TrackingConfig(), fps=30)
    feed(smoother, [(70, 0.9)] * 5)
    assert gender_of(smoother) == MALE
    ended = smoother.end([1])
    feed(smoother, [(20, 0.1)] * 5)
    assert smoother.smoothed(ONE).age[0] == pytest.approx(20)
    assert gender_of(smoother) == FEMALE
    smoother.observe(np.array([2]))
    smoother.merge(2, ended[1])  # the person of track 1 came back as track 2
    assert smoother.smoothed(np.array([2])).age[0] == pytest.approx(70)


def test_given_sharper_larger_frontal_views_then_quality_is_higher() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 400, 3), dtype=np.uint8)
    image[:, 200:] = cv2.GaussianBlur(image[:, 200:], (15, 15), 5)
    boxes = np.array([[20, 20, 120, 120], [220, 20, 320, 120]], np.float32)
    sharp, blurred = sharpness(image, boxes)
    assert sharp > 0.8 and blurred < sharp / 2
    frontal = np.array([[[40, 50], [80, 50], [60, 70], [60, 90], [20, 60], [100, 60]]], np.float32)
    profile = frontal.copy()
    profile[0, 2, 0] = 78  # nose next to the left eye: turned away
    assert frontalness(frontal)[0] > 0.95 and frontalness(profile)[0] < 0.5
    small = Faces(boxes[:1] / 4, np.array([0.9], np.float32), frontal / 4)
    large = Faces(boxes[:1], np.array([0.9], np.float32), frontal)
    assert view_quality(image, large)[0] > view_quality(image, small)[0]


def test_given_shared_clip_when_run_with_tracks_then_csv_has_one_row_per_track(
    tmp_path: Path,
) -> None:
    clip = require(VIDEOS / "livePortrait__driving__d3.mp4")
    tracks = tmp_path / "tracks.csv"
    done = subprocess.run(
        [sys.executable, "-m", "stream", "run", str(clip), "--no-window", "--tracks", str(tracks)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(tracks.open()))
    assert rows, "the talking head is one track"
    main = max(rows, key=lambda row: int(row["frames_seen"]))
    assert int(main["frames_seen"]) >= 0.9 * 354, "one person in view keeps one id"
    # Confirmed (and labelled) on its third detection.
    assert int(main["first_frame"]) == 2 and int(main["last_frame"]) >= 350
    assert 0 < int(main["frames_estimated"]) < int(main["frames_seen"]) / 3, "settled tracks skip"
    assert 1 <= float(main["age"]) <= 80 and float(main["age_uncertainty"]) < 5
    assert main["gender"] in ("female", "male")
    assert (float(main["p_male"]) >= 0.5) == (main["gender"] == "male")
    assert 0 < float(main["mean_quality"]) <= 1
    assert float(main["last_t_ms"]) == pytest.approx(int(main["last_frame"]) * 1000 / 30, abs=1)
