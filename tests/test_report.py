"""`agestream report` on a real run of the shared Hamilton clip: people.csv against the JSON
lines, snapshots that hold faces, counts.csv against people.csv, and the page in Chromium."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import pytest

from detectors import create_detector
from stream.align import pad_to_canvas
from stream.config import DetectorConfig
from stream.types import PERSON_AGE_GROUPS, SHOWN_GENDERS
from tests.conftest import HAMILTON, chromium_page, keep_screenshot, require

ROOT = Path(__file__).resolve().parents[1]


def agestream(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def jsonl_tracks(path: Path) -> dict[int, list[float]]:
    """Seconds at which each non-null track appears, read straight from the JSON lines."""
    seen: dict[int, list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for face in record.get("faces", []):
            if face.get("track") is not None:
                seen[face["track"]].append(record["t_ms"] / 1000)
    return seen


@pytest.fixture(scope="module")
def run_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    video = require(HAMILTON)
    jsonl = tmp_path_factory.mktemp("run") / "run.jsonl"
    done = agestream("run", video, "--no-window", "--json", jsonl)
    assert done.returncode == 0, done.stderr
    return jsonl


@pytest.fixture(scope="module")
def report_dir(run_jsonl: Path) -> Path:
    out = run_jsonl.parent / "report"
    done = agestream("report", run_jsonl, "--output", out, "--source", HAMILTON)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out / 'index.html'}" in done.stdout
    return out


def test_given_a_run_then_people_csv_has_one_row_per_track_with_its_first_and_last_time(
    run_jsonl: Path, report_dir: Path
) -> None:
    tracks = jsonl_tracks(run_jsonl)
    rows = read_csv(report_dir / "people.csv")
    assert len(tracks) >= 3  # the clip has scene cuts and several people
    assert sorted(int(row["person"]) for row in rows) == sorted(tracks)
    for row in rows:
        times = tracks[int(row["person"])]
        assert float(row["first_s"]) == pytest.approx(min(times), abs=5e-4)
        assert float(row["last_s"]) == pytest.approx(max(times), abs=5e-4)
        assert int(row["frames"]) == len(times)
        assert 1 <= int(row["views"]) <= int(row["frames"])
        assert row["age_group"] in PERSON_AGE_GROUPS and row["gender"] in SHOWN_GENDERS
    assert [float(r["first_s"]) for r in rows] == sorted(float(r["first_s"]) for r in rows)


def test_given_the_source_then_each_snapshot_is_a_jpeg_of_160_px_or_more_holding_a_face(
    report_dir: Path,
) -> None:
    rows = read_csv(report_dir / "people.csv")
    assert all(row["snapshot"] == f"snapshots/person-{row['person']}.jpg" for row in rows)
    with create_detector(DetectorConfig(model="short", min_confidence=0.4), 640) as detector:
        for row in rows:
            path = report_dir / row["snapshot"]
            assert path.read_bytes()[:3] == b"\xff\xd8\xff", f"{path} is not a JPEG"
            image = cv2.imread(str(path))
            assert min(image.shape[:2]) >= 160, f"{path}: {image.shape}"
            # Padded as `evaluate` does: BlazeFace misses faces that fill the image.
            canvas, (dx, dy) = pad_to_canvas(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            faces = detector.detect(canvas)
            height, width = image.shape[:2]
            centres = [((x1 + x2) / 2 - dx, (y1 + y2) / 2 - dy) for x1, y1, x2, y2 in faces.xyxy]
            # The person's own face, not just any: it is near the snapshot's centre.
            assert any(
                abs(x - width / 2) < width / 4 and abs(y - height / 2) < height / 4
                for x, y in centres
            ), f"no face near the centre of {path}: {centres}"


def test_given_a_run_then_counts_csv_agrees_with_people_csv_and_the_json_lines(
    run_jsonl: Path, report_dir: Path
) -> None:
    people = {int(row["person"]): row for row in read_csv(report_dir / "people.csv")}
    counts = read_csv(report_dir / "counts.csv")
    tracks = jsonl_tracks(run_jsonl)
    assert 1 <= len(counts) <= 30
    for row in counts:
        start, end = float(row["bin_start_s"]), float(row["bin_end_s"])
        assert end - start >= 1.0 - 1e-6
        present = [t for t, times in tracks.items() if any(start <= s < end for s in times)]
        assert int(row["people"]) == len(present)
        for group in PERSON_AGE_GROUPS:
            expected = sum(people[t]["age_group"] == group for t in present)
            assert int(row[f"age_{group}"]) == expected
        for gender in SHOWN_GENDERS:
            assert int(row[gender]) == sum(people[t]["gender"] == gender for t in present)
        assert sum(int(row[f"age_{g}"]) for g in PERSON_AGE_GROUPS) == int(row["people"])
    # Every person is counted in at least one bin.
    assert sum(int(row["people"]) for row in counts) >= len(people)


def test_given_the_report_then_chromium_loads_every_image_and_shows_every_person(
    report_dir: Path, tmp_path: Path
) -> None:
    with chromium_page(1200, 900) as page:
        page.goto((report_dir / "index.html").as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img", "all => all.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        table_rows = page.locator("table#people tbody tr").count()
        shot = tmp_path / "report-chromium.png"
        page.screenshot(path=str(shot), full_page=True)
    people = read_csv(report_dir / "people.csv")
    assert table_rows == len(people)
    assert len(images) == len(people) + 3  # a snapshot each, three charts
    assert all(complete and width > 0 for _, complete, width in images), images
    assert shot.stat().st_size > 10_000
    keep_screenshot(shot)


def with_source(run_jsonl: Path, path: Path, source: str) -> Path:
    """The run's JSON lines with its start record naming `source` as the video."""
    start, *rest = run_jsonl.read_text().splitlines()
    path.write_text("\n".join([json.dumps({**json.loads(start), "source": source}), *rest]) + "\n")
    return path


def test_given_no_readable_source_then_no_snapshots_a_placeholder_and_a_warning(
    run_jsonl: Path, tmp_path: Path
) -> None:
    moved = with_source(run_jsonl, tmp_path / "moved.jsonl", str(tmp_path / "gone.mp4"))
    out = tmp_path / "report"
    done = agestream("report", moved, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "--source VIDEO" in done.stderr
    assert not (out / "snapshots").exists()
    rows = read_csv(out / "people.csv")
    assert all(row["snapshot"] == "" for row in rows)
    page = (out / "index.html").read_text()
    assert page.count('class="placeholder"') == len(rows)


def test_given_a_run_then_its_start_record_gives_the_video_and_quality_the_best_view(
    run_jsonl: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    done = agestream("report", run_jsonl, "--output", out)  # no --source
    assert done.returncode == 0, done.stderr
    rows = {int(row["person"]): row for row in read_csv(out / "people.csv")}
    best: dict[int, tuple[float, int]] = {}
    for line in run_jsonl.read_text().splitlines():
        record = json.loads(line)
        for face in record.get("faces", []):
            if face["track"] is not None:
                seen = (face["quality"], -record["frame"])  # the first of equal views
                best[face["track"]] = max(best.get(face["track"], seen), seen)
    assert set(rows) == set(best), "one row per confirmed person, none for unconfirmed faces"
    for person, (_, frame) in best.items():
        assert int(rows[person]["best_frame"]) == -frame
        assert (out / rows[person]["snapshot"]).is_file()
    assert str(HAMILTON.resolve()) in (out / "index.html").read_text()


def test_given_a_folder_that_is_not_empty_then_it_is_refused_and_left_alone(
    run_jsonl: Path, tmp_path: Path
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    done = agestream("report", run_jsonl, "--output", tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("agestream: error: report folder")
    assert "not empty" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_given_a_missing_jsonl_then_one_error_line_and_exit_1(tmp_path: Path) -> None:
    done = agestream("report", tmp_path / "nope.jsonl", "--output", tmp_path / "out")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"agestream: error: JSON lines file not found: {tmp_path / 'nope.jsonl'}"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"event": "start", "source": "x.mp4"}\n', "no frame records"),
        ('{"frame": 0, "t_ms": 0, "faces": []}\nnot json\n{"frame": 1, "t_ms": 33, "faces": []}\n',
         "bad.jsonl:2: not JSON"),
    ],
    ids=["no-frames", "malformed-middle-line"],
)  # fmt: skip
def test_given_a_jsonl_without_usable_frames_then_one_error_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(text)
    done = agestream("report", jsonl, "--output", tmp_path / "out")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agestream: error: ") and expected in lines[0]


def test_given_markup_in_the_source_name_then_the_page_escapes_it(tmp_path: Path) -> None:
    from stream.reports.people import RunInfo, index_html

    run = RunInfo(tmp_path / "r.jsonl", '<script>alert("x")</script>.mp4', 1, 0.0, 1.0)
    page = index_html(run, [], {})
    assert "<script>" not in page and "&lt;script&gt;" in page


def face_line(frame: int, t_ms: str, face: str) -> str:
    """A frame record of one face (fields spelled as JSON text, so NaN can be written)."""
    return f'{{"frame": {frame}, "t_ms": {t_ms}, "faces": [{face}]}}\n'


GOOD_FACE = '{"box": [10, 10, 50, 50], "score": 0.9, "track": 1, "age": 30.0, "gender": "male"}'


@pytest.mark.parametrize(
    ("face", "t_ms", "message"),
    [
        ('{"box": [10, 10, 50, 50], "track": 1, "age": NaN}', "33",
         '"age" must be a number or null, got nan'),
        ('{"box": [10, 10, 50, 50], "track": 1e400}', "33",
         '"track" must be a whole number from 0 to 9223372036854775807 or null, got inf'),
        ('{"box": [10, 10, 50, 50], "track": 1' + "0" * 300 + "}", "33",
         '"track" must be a whole number from 0 to 9223372036854775807 or null, got 1000'),
        ('{"box": [10, 10, 50, 50], "track": "x"}', "33", '"track" must be a whole number'),
        ('{"box": [10, 10, 50, 50], "track": 1, "gender": 5}', "33",
         '"gender" must be text or null, got 5'),
        ('{"box": [10, 10, 50], "track": 1}', "33", 'a face needs a "box" of 4 numbers'),
        ('{"box": [10, 10, 50, 50], "track": 1, "quality": "high"}', "33",
         "\"quality\" must be a number or null, got 'high'"),
        ('{"box": [10, 10, 50, 50], "track": 1, "p_male": 7}', "33",
         '"p_male" must be from 0 to 1, got 7'),
        (GOOD_FACE, "NaN", 'a frame record needs a finite number "t_ms"'),
        (GOOD_FACE, "1e300", '"t_ms" is beyond 1e+13'),
    ],
    ids=["nan-age", "inf-track", "huge-track", "text-track", "int-gender", "short-box",
         "text-quality", "p_male-7", "nan-time", "huge-time"],
)  # fmt: skip
def test_given_a_bad_record_then_one_error_names_file_and_line_and_nothing_is_written(
    tmp_path: Path, face: str, t_ms: str, message: str
) -> None:
    from stream.reports.flicker import RecordsError
    from stream.reports.people import write_people_report

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(face_line(0, "0", GOOD_FACE) + face_line(1, t_ms, face))
    with pytest.raises(RecordsError) as raised:
        write_people_report(jsonl, tmp_path / "out")
    assert str(raised.value).startswith(f"{jsonl}:2: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_given_a_bad_record_when_reported_then_one_error_line_with_file_and_line(
    tmp_path: Path,
) -> None:
    jsonl = tmp_path / "bad.jsonl"
    nan_age = '{"box": [10, 10, 50, 50], "track": 1, "age": NaN}'
    jsonl.write_text(face_line(0, "0", GOOD_FACE) + face_line(1, "33", nan_age))
    done = agestream("report", jsonl, "--output", tmp_path / "out")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f'agestream: error: {jsonl}:2: "age" must be a number or null, got nan'
    ]
    assert not (tmp_path / "out").exists()


def test_given_times_that_go_back_then_the_run_spans_them_all(tmp_path: Path) -> None:
    from stream.reports.people import write_people_report

    jsonl = tmp_path / "joined.jsonl"
    jsonl.write_text(face_line(0, "5000", GOOD_FACE) + face_line(1, "-100000", GOOD_FACE))
    report = write_people_report(jsonl, tmp_path / "out")
    # 105 s between them, plus one frame period (1/30 s: the times give none).
    assert (report.run.start_s, report.run.duration_s) == (-100.0, pytest.approx(105 + 1 / 30))
    (row,) = read_csv(tmp_path / "out" / "people.csv")
    assert (float(row["first_s"]), float(row["last_s"])) == (-100.0, 5.0)


def test_given_a_failure_while_writing_then_no_folder_is_left_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stream.reports.people as people
    from stream.outputs import OutputError

    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text(face_line(0, "0", GOOD_FACE) + face_line(1, "33", GOOD_FACE))

    def failing_page(*args: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(people, "index_html", failing_page)
    with pytest.raises(OutputError, match=r"cannot write report folder .*out: No space .*ENOSPC"):
        people.write_people_report(jsonl, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl"]
