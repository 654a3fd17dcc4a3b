from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream.reports.flicker import (
    age_group_index,
    disagrees,
    flicker_report,
    format_flicker,
    label_changes,
)
from tests.conftest import VIDEOS, require


def test_given_seed_000_groups_then_ages_fall_in_them() -> None:
    assert [age_group_index(a) for a in (0, 2.9, 3, 9.9, 10, 69.9, 70, 95)] == [
        0,
        0,
        1,
        1,
        2,
        7,
        8,
        8,
    ]


def test_given_labels_with_gaps_then_only_changes_between_known_labels_count() -> None:
    assert label_changes([1, None, 1, 2, None, 2, 1]) == 2
    assert label_changes([None, None]) == 0


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def face(track: int, age: float, gender: str, age_raw: float | None, p_raw: float | None) -> dict:
    return {
        "box": [0, 0, 1, 1],
        "score": 1,
        "age": age,
        "gender": gender,
        "p_male": 0.5,
        "track": track,
        "age_raw": age_raw,
        "p_male_raw": p_raw,
    }


def test_given_a_run_then_changes_per_track_second_are_raw_vs_smoothed(tmp_path: Path) -> None:
    records = [
        {
            "frame": i,
            "t_ms": i * 100.0,
            "faces": [face(1, 25, "male", 29 if i % 2 else 31, 0.6 if i % 2 else 0.4)],
        }
        for i in range(10)
    ] + [{"event": "reconnecting", "t_ms": 1000.0}]
    records[5]["faces"].append(face(2, 50, "female", None, None))
    report = flicker_report(write_jsonl(tmp_path / "run.jsonl", records))
    assert report["tracks"] == 2 and report["short_tracks"] == 1
    assert report["track_seconds"] == pytest.approx(1.0 + 0.1)
    assert report["age_group_changes_per_s"]["raw"] == pytest.approx(9 / 1.1)
    assert report["age_group_changes_per_s"]["smoothed"] == 0
    assert report["gender_changes_per_s"]["raw"] == pytest.approx(9 / 1.1)


def test_given_a_report_then_its_text_names_every_column_and_says_gender(tmp_path: Path) -> None:
    records = [
        {"frame": i, "t_ms": i * 100.0, "faces": [face(1, 25, "male", 29 + 2 * (i % 2), 0.6)]}
        for i in range(10)
    ]
    text = format_flicker(flicker_report(write_jsonl(tmp_path / "run.jsonl", records)))
    header, row = text.splitlines()[1:3]
    assert header.split() == [
        "track", "frames", "seconds", "age", "raw", "age", "smoothed", "gender", "raw", "gender",
        "smoothed", "unsure", "contradicting", "cuts",
    ]  # fmt: skip
    assert row.split() == ["1", "10", "1.0", "9", "0", "0", "0", "0", "0", "of", "10", "0"]
    assert "sex" not in text and "gender raw 0.000, smoothed 0.000" in text


def test_given_raw_estimates_then_only_strong_contradictions_of_the_label_count() -> None:
    assert disagrees(face(1, 30, "male", 39, 0.6)) is False, "9 years and p 0.6: one person"
    assert disagrees(face(1, 30, "male", 43, 0.9)) is True, "13 years off a 30-year-old (> 12)"
    assert disagrees(face(1, 60, "male", 80, 0.9)) is False, "within 40 % of 60"
    assert disagrees(face(1, 30, "male", 30, 0.15)) is True, "a clear female view of a male"
    assert disagrees(face(1, 30, "unsure", 30, 0.05)) is False, "no gender shown"
    assert disagrees(face(1, 30, "male", None, None)) is None, "not estimated"


def test_given_a_track_of_two_people_across_a_cut_then_it_is_flagged(tmp_path: Path) -> None:
    adult, child = face(1, 35, "female", 36, 0.1), face(1, 30, "female", 5, 0.4)
    records = [
        {"frame": i, "t_ms": i * 100.0, "faces": [adult if i < 6 else child]}
        | ({"cut": True} if i == 6 else {})
        for i in range(12)
    ]
    report = flicker_report(write_jsonl(tmp_path / "run.jsonl", records))
    assert report["cuts"] == 1 and report["tracks_across_cuts"] == [1]
    assert report["suspect_tracks"] == [1]
    assert report["per_track"][0]["disagreeing_share"] == 0.5
    text = format_flicker(report)
    assert "shot cuts: 1" in text and "more than one person?): 1" in text


def test_given_a_shared_clip_then_smoothed_flicker_is_at_most_a_fifth_of_raw(
    tmp_path: Path,
) -> None:
    clip = require(VIDEOS / "face_recognition__short_hamilton_clip.mp4")
    records, report_path = tmp_path / "run.jsonl", tmp_path / "flicker.json"
    # Every face estimated every frame, so that the raw series is complete.
    for args in (
        ["run", str(clip), "--no-window", "--json", str(records), "--reestimate-every", "1"],
        ["evaluate-video", str(records), "--json", str(report_path)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "stream", *args], capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    for measure in ("age_group_changes_per_s", "gender_changes_per_s"):
        assert report[measure]["raw"] > 0.5
        assert report[measure]["smoothed"] <= report[measure]["raw"] / 5
