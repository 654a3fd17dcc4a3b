"""`agestream report` of a stream's folder of segments (what serve --cluster writes, one segment
per incarnation): real runs of two shared clips joined into one report, ids qualified per
segment, one time axis with the gap nobody watched, snapshots from each segment's own source,
a killed node's truncated last line skipped, and the errors for an empty or damaged folder."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.reports.flicker import RecordsError
from stream.reports.people import face_crop, read_frames, write_people_report
from tests.conftest import HAMILTON, VIDEOS, require

ROOT = Path(__file__).resolve().parents[1]
DRIVING = VIDEOS / "livePortrait__driving__d3.mp4"
STREAM = "door"
FIRST, SECOND = f"{STREAM}-20240501T100000Z-node-a", f"{STREAM}-20240501T100012Z-node-b"
GAP_S = 12.5  # the second segment's "started" is this long after the first's


@dataclass(frozen=True)
class Run:
    """A real run's JSON lines: its start record, the rest, and where each track was seen."""

    start: dict
    lines: list[str]  # the frame records, as written
    source: Path

    def tracks(self) -> dict[int, dict[int, tuple[float, list[float]]]]:
        """Per track, per frame: (seconds, box) of its face."""
        seen: dict[int, dict[int, tuple[float, list[float]]]] = defaultdict(dict)
        for line in self.lines:
            record = json.loads(line)
            for face in record["faces"]:
                if face["track"] is not None:
                    seen[face["track"]][record["frame"]] = (record["t_ms"] / 1000, face["box"])
        return seen


def real_run(video: Path, frames: int, jsonl: Path) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "run", video, "--json", jsonl, "--no-window", "--fast",
         "--max-frames", str(frames)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    start, *lines = jsonl.read_text().splitlines()
    return Run(json.loads(start), lines, video)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run]:
    """Hamilton (two people in 100 frames) and a driving clip (one person): their track ids
    both start at 1, as a restarted stream's do."""
    folder = tmp_path_factory.mktemp("runs")
    first = real_run(require(HAMILTON), 100, folder / "a.jsonl")
    second = real_run(require(DRIVING), 30, folder / "b.jsonl")
    assert len(first.tracks()) >= 2 and len(second.tracks()) >= 1
    assert set(first.tracks()) & set(second.tracks()), "the ids must clash for the test to hold"
    return first, second


def write_segment(path: Path, run: Run, start: dict, extra: list[str], tail: str = "") -> Path:
    lines = [json.dumps({**run.start, **start}), *extra, *run.lines]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def stream_folder(root: Path, runs: tuple[Run, Run], cluster_keys: bool = True) -> Path:
    """DIR/door/ as serve --cluster leaves it after node-a died and node-b took the stream
    over: the second segment partial, with a "moved" record and a truncated last line."""
    folder = root / STREAM
    folder.mkdir()
    first, second = runs
    keys = [
        {"node": "node-a", "started": "2024-05-01T10:00:00Z"},
        {"node": "node-b", "started": f"2024-05-01T10:00:{GAP_S:04.1f}Z"},
    ]
    if not cluster_keys:
        keys = [{}, {}]
    moved = json.dumps({"event": "moved", "t_ms": 0.0, "from_node": "node-a", "node": "node-b"})
    write_segment(folder / f"{FIRST}.jsonl", first, keys[0], [])
    partial = folder / f"{SECOND}.partial.jsonl"
    write_segment(partial, second, keys[1], [moved], tail=second.lines[-1][:30])
    (folder / "notes.jsonl").write_text("not a segment\n")  # not named after the stream
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_given_two_segments_then_one_report_with_qualified_people_on_one_time_axis(
    runs: tuple[Run, Run], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = stream_folder(tmp_path, runs)
    caplog.set_level(logging.WARNING)
    report = write_people_report(folder, tmp_path / "report")

    first, second = (run.tracks() for run in runs)
    rows = {row["person"]: row for row in read_csv(tmp_path / "report" / "people.csv")}
    expected = {f"s1-{track}" for track in first} | {f"s2-{track}" for track in second}
    assert report.people == len(first) + len(second) == len(rows)
    assert set(rows) == expected
    for track, seen in second.items():
        row = rows[f"s2-{track}"]
        times = [t for t, _ in seen.values()]
        assert float(row["first_s"]) == pytest.approx(GAP_S + min(times), abs=5e-4)
        assert float(row["last_s"]) == pytest.approx(GAP_S + max(times), abs=5e-4)
        assert float(row["first_s"]) >= GAP_S
    end_of_first = max(float(rows[f"s1-{track}"]["last_s"]) for track in first)
    assert end_of_first < 4 and report.run.duration_s > GAP_S

    truncated = f"{folder / (SECOND + '.partial.jsonl')}:{len(runs[1].lines) + 3}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (skipped,) = [warning for warning in warnings if "skipping" in warning]
    assert skipped.startswith(f"{truncated}: not JSON") and "partial last line" in skipped

    page = (tmp_path / "report" / "index.html").read_text()
    assert "2 segments" in page and "node-a" in page and "node-b" in page
    assert "Person ids restart at each segment" in page
    assert "Nobody was watched from" in page
    assert "notes.jsonl" not in page


def test_given_two_segments_then_each_snapshot_is_cut_from_its_own_segments_source(
    runs: tuple[Run, Run], tmp_path: Path
) -> None:
    write_people_report(stream_folder(tmp_path, runs), tmp_path / "report")
    rows = read_csv(tmp_path / "report" / "people.csv")
    for row in rows:
        segment, track = row["person"].split("-")
        run = runs[int(segment[1:]) - 1]
        frame = int(row["best_frame"])
        _, (x1, y1, x2, y2) = run.tracks()[int(track)][frame]
        expected = face_crop(read_frames(run.source, {frame})[frame], (x1, y1, x2, y2))
        snapshot = cv2.imread(str(tmp_path / "report" / row["snapshot"]))
        assert snapshot.shape == expected.shape, row["person"]
        difference = np.abs(snapshot.astype(float) - expected.astype(float)).mean()
        assert difference < 8, f"{row['person']}: not its own segment's frame ({difference:.1f})"


def test_given_a_gap_between_segments_then_counts_say_nobody_watched_it(
    runs: tuple[Run, Run], tmp_path: Path
) -> None:
    write_people_report(stream_folder(tmp_path, runs), tmp_path / "report")
    counts = read_csv(tmp_path / "report" / "counts.csv")
    inside_gap = [row for row in counts if 5 <= float(row["bin_start_s"]) < 11]
    assert inside_gap and all(float(row["watched_s"]) == 0 for row in inside_gap)
    assert all(row["people"] == "0" for row in inside_gap)
    first = counts[0]
    assert float(first["watched_s"]) == pytest.approx(
        float(first["bin_end_s"]) - float(first["bin_start_s"])
    )


def test_given_start_records_without_cluster_keys_then_the_file_names_give_times_and_nodes(
    runs: tuple[Run, Run], tmp_path: Path
) -> None:
    report = write_people_report(stream_folder(tmp_path, runs, False), tmp_path / "report")
    segments = report.run.segments
    assert [(s.label, s.node, s.offset_s) for s in segments] == [
        ("s1", "node-a", 0.0),
        ("s2", "node-b", 12.0),  # the names' stamps are whole seconds
    ]
    assert [s.partial for s in segments] == [False, True]


def test_given_a_final_and_a_partial_of_one_segment_then_the_final_is_read(
    runs: tuple[Run, Run], tmp_path: Path
) -> None:
    folder = stream_folder(tmp_path, runs)
    (folder / f"{FIRST}.partial.jsonl").write_text('{"frame": 0, "t_ms": 0, "faces": 7}\n{}\n')
    report = write_people_report(folder, tmp_path / "report")
    assert [s.jsonl.name for s in report.run.segments] == [
        f"{FIRST}.jsonl",
        f"{SECOND}.partial.jsonl",
    ]


def test_given_a_damaged_middle_line_then_one_error_names_file_and_line(
    runs: tuple[Run, Run], tmp_path: Path
) -> None:
    folder = stream_folder(tmp_path, runs)
    segment = folder / f"{FIRST}.jsonl"
    lines = segment.read_text().splitlines()
    lines[5] = lines[5][:20]
    segment.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordsError) as raised:
        write_people_report(folder, tmp_path / "report")
    assert str(raised.value).startswith(f"{segment}:6: not JSON")
    assert not (tmp_path / "report").exists()


def test_given_a_folder_without_segments_then_one_error_line_names_it_and_what_it_holds(
    tmp_path: Path,
) -> None:
    folder = tmp_path / STREAM
    folder.mkdir()
    (folder / "other-20240501T100000Z-node-a.jsonl").write_text("{}\n")  # another stream's
    done = subprocess.run(
        [sys.executable, "-m", "stream", "report", folder, "--output", tmp_path / "report"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"agestream: error: no segments in {folder}: expected "
        f"{STREAM}-<YYYYmmddTHHMMSSZ>-<node>.jsonl (or .partial.jsonl) files, as serve "
        "--cluster --output-dir writes, or pass a run's --json file"
    ]
    assert not (tmp_path / "report").exists()
