"""Who is who, through the whole pipeline on made clips with a known truth: hard cuts between
seven people at one place (a child among them, one adult twice), a queue of four people at one
spot, and two people dressed alike; and what `evaluate-video` says of a run that got it wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clips import (
    Truth,
    children_with_adult_age,
    cuts_clip,
    dressed_alike_clip,
    holdings,
    merges_and_splits,
    queue_clip,
)
from tests.conftest import UTKFACE, VIDEOS, require, run_json_lines

# The settings of a tracker that knows no identities: IoU and clothes colour alone.
BOXES_ONLY = "tracking:\n  cut_threshold: 0.0\n  identity_distance: 0.0\n"


@pytest.fixture(scope="module")
def who(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Truth]]:
    require(VIDEOS)
    require(UTKFACE)
    folder = tmp_path_factory.mktemp("who")
    return {
        build.__name__: build(VIDEOS, UTKFACE, folder / f"{build.__name__}.mp4")
        for build in (cuts_clip, queue_clip, dressed_alike_clip)
    }


@pytest.fixture(scope="module")
def who_runs(
    who: dict[str, tuple[Path, Truth]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict]]:
    folder = tmp_path_factory.mktemp("who-runs")
    return {
        name: [r for r in run_json_lines(path, folder / f"{name}.jsonl") if "faces" in r]
        for name, (path, _) in who.items()
    }


def scores(records: list[dict], truth: Truth) -> tuple[int, int, int, int]:
    """Ids, merges, splits and people without an id."""
    held = holdings(records, truth)
    return (len(held), *merges_and_splits(held, truth))


def test_given_hard_cuts_between_seven_people_then_one_track_each_and_the_returner_matched(
    who: dict[str, tuple[Path, Truth]], who_runs: dict[str, list[dict]]
) -> None:
    records, truth = who_runs["cuts_clip"], who["cuts_clip"][1]
    assert truth.people_count == 7
    assert scores(records, truth) == (7, 0, 0, 0), "7 ids, no merge, no split, nobody missed"
    cuts = [r["frame"] for r in records if r.get("cut")]
    starts = sorted({a.first_frame for a in truth.appearances} - {0})
    assert cuts == starts, "a cut where each segment starts, and nowhere else"
    held = holdings(records, truth)
    returner = [track for track, people in held.items() if people["d3"]]
    assert len(returner) == 1, "d3, cut to again after five others, gets their id back"


def test_given_a_child_after_an_adult_at_the_same_place_then_never_an_adults_age(
    who: dict[str, tuple[Path, Truth]], who_runs: dict[str, list[dict]]
) -> None:
    records, truth = who_runs["cuts_clip"], who["cuts_clip"][1]
    assert children_with_adult_age(records, truth) == 0
    child = [
        face
        for record in records
        for face in record["faces"]
        if face["track"] is not None
        and (truth.age_of(truth.person_at(record["frame"], face["box"]) or "") or 99) < 13
    ]
    assert len(child) > 30, "the child is shown"


def test_given_a_queue_at_one_spot_then_each_person_their_own_track_from_their_first_frame(
    who: dict[str, tuple[Path, Truth]], who_runs: dict[str, list[dict]]
) -> None:
    records, truth = who_runs["queue_clip"], who["queue_clip"][1]
    assert scores(records, truth) == (4, 0, 0, 0)
    # Not one frame of a newcomer under the id of whoever stood there before, even when the
    # next person steps in between two frames.
    for record in records:
        for face in record["faces"]:
            person = truth.person_at(record["frame"], face["box"])
            if face["track"] is not None and person is not None:
                others = {
                    p for p, n in holdings(records, truth)[face["track"]].items() if p != person
                }
                assert not others, (record["frame"], person, others)


def test_given_two_people_dressed_alike_then_two_people(
    who: dict[str, tuple[Path, Truth]], who_runs: dict[str, list[dict]]
) -> None:
    records, truth = who_runs["dressed_alike_clip"], who["dressed_alike_clip"][1]
    assert scores(records, truth) == (2, 0, 0, 0)


def test_given_a_tracker_of_boxes_only_then_evaluate_video_flags_the_track_of_many_people(
    who: dict[str, tuple[Path, Truth]], tmp_path: Path
) -> None:
    config = tmp_path / "boxes-only.yaml"
    config.write_text(BOXES_ONLY)
    path, truth = who["cuts_clip"]
    records = [r for r in run_json_lines(path, tmp_path / "boxes.jsonl", config) if "faces" in r]
    ids, merges, _, _ = scores(records, truth)
    assert merges >= 1 and ids < 7, "the failure the identity rules fix"
    done = subprocess.run(
        [sys.executable, "-m", "stream", "evaluate-video", str(tmp_path / "boxes.jsonl")]
        + ["--json", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(done.stdout)
    merged = [t for t, people in holdings(records, truth).items() if len(people) > 1]
    assert set(merged) <= set(report["suspect_tracks"]), report["per_track"]
