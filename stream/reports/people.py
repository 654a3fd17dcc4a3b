"""Per-person report of a run, from its JSON lines: people.csv, face snapshots cut from the
source video, presence charts, counts.csv and a static index.html."""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import cv2
import numpy as np

from stream.outputs import PARTIAL, OutputError, failure, write_whole
from stream.reports.flicker import RecordsError, read_numbered_records
from stream.types import PERSON_AGE_GROUPS, SHOWN_GENDERS, person_age_group

if TYPE_CHECKING:  # matplotlib is imported only when a chart is drawn
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
SNAPSHOT_MARGIN = 1.6  # crop side over the face box's longer side: hair and chin in view
SNAPSHOT_MIN_PX = 160
MAX_BINS = 30
PEOPLE_COLUMNS = (
    "person", "first_s", "last_s", "duration_s", "age", "age_uncertainty", "age_low", "age_high",
    "age_group",
    "gender", "p_male", "frames", "views", "best_frame", "best_t_s", "snapshot",
)  # fmt: skip
# Track ids count up from 0; beyond int64 one is not a run's (and its snapshot's name would
# be too long for a file system).
MAX_TRACK = 2**63 - 1
# Times are milliseconds into the run: beyond 1e13 (317 years) a record is not a run's, and
# the spans between such times overflow.
MAX_T_MS = 1e13
# The face fields the report reads as numbers (null: not known).
FACE_NUMBERS = ("age", "age_uncertainty", "age_low", "age_high", "p_male", "quality", "score")
CHARTS = (
    ("chart-age.png", "People in view by age group"),
    ("chart-gender.png", "People in view by gender"),
    ("chart-groups.png", "People per age group and gender"),
)


@dataclass(frozen=True)
class RunInfo:
    """What the report says about the run as a whole."""

    jsonl: Path
    source: str | None  # as the run's start event names it (a URL is already redacted)
    frames: int
    start_s: float
    duration_s: float  # each frame stands for one frame period


@dataclass(frozen=True)
class Person:
    """One track of the run, as people.csv shows it."""

    track: int
    first_s: float
    last_s: float
    duration_s: float
    age: float | None  # the track's last smoothed age
    age_uncertainty: float | None
    age_low: float | None  # the track's last 80 % age range; None without one
    age_high: float | None
    gender: str | None  # None for age-only estimators
    p_male: float | None
    frames: int
    views: int  # frames whose face was estimated (age_raw not null)
    best_frame: int
    best_t_s: float
    best_box: tuple[float, float, float, float]
    seen_s: tuple[float, ...]

    @property
    def age_group(self) -> str:
        return UNKNOWN if self.age is None else person_age_group(self.age)

    @property
    def gender_key(self) -> str:
        return self.gender if self.gender in SHOWN_GENDERS else UNKNOWN


@dataclass(frozen=True)
class Bins:
    """Presence over time: per bin, which people were seen in it."""

    start_s: float
    width_s: float
    people: tuple[frozenset[int], ...]


@dataclass(frozen=True)
class Report:
    """What `write_people_report` wrote."""

    directory: Path
    people: int
    snapshots: int
    run: RunInfo


def start_event(path: Path) -> dict:
    """The run's first line when it is a start event (newer runs write one), else {}."""
    with path.open(encoding="utf-8", errors="replace") as file:
        try:
            first = json.loads(file.readline())
        except json.JSONDecodeError:
            return {}
    return first if isinstance(first, dict) and first.get("event") == "start" else {}


def _frame_period_s(records: list[dict], start: dict) -> float:
    fps = start.get("fps")
    if isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0:
        return 1 / fps
    times = np.array([record["t_ms"] for record in records], dtype=float)
    period = float(np.median(np.diff(times))) / 1000 if len(times) > 1 else 0.0
    return period if period > 0 else 1 / 30


def _view_quality(face: dict) -> float:
    # Newer runs rate each view (score x size x sharpness x frontalness); older ones only
    # have the detector's score.
    quality = face.get("quality")
    return float(quality if quality is not None else face.get("score") or 0.0)


def _person(track: int, seen: list[tuple[dict, dict]], period_s: float) -> Person:
    """`seen`: (frame record, face) pairs of one track, in frame order."""
    last = seen[-1][1]
    best_record, best_face = max(seen, key=lambda pair: _view_quality(pair[1]))
    known_gender = [face["gender"] for _, face in seen if face.get("gender") is not None]
    times = [record["t_ms"] / 1000 for record, _ in seen]
    first_s, last_s = min(times), max(times)
    x1, y1, x2, y2 = (float(v) for v in best_face["box"])
    return Person(
        track=track,
        first_s=first_s,
        last_s=last_s,
        duration_s=last_s - first_s + period_s,
        age=last.get("age"),
        age_uncertainty=last.get("age_uncertainty"),
        age_low=last.get("age_low"),
        age_high=last.get("age_high"),
        gender=known_gender[-1] if known_gender else None,
        p_male=last.get("p_male"),
        frames=len(seen),
        views=sum(face.get("age_raw") is not None for _, face in seen),
        best_frame=int(best_record["frame"]),
        best_t_s=best_record["t_ms"] / 1000,
        best_box=(x1, y1, x2, y2),
        seen_s=tuple(times),
    )


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    """A finite JSON number (json reads NaN and Infinity, which agestream never writes)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_face(face: dict, where: str) -> int:
    """The track id of a tracked face, once every field the report reads is checked.

    Raises:
        RecordsError: `where` (FILE:LINE) and what is wrong.
    """
    track = face["track"]
    if not isinstance(track, int) or isinstance(track, bool) or not 0 <= track <= MAX_TRACK:
        raise RecordsError(
            f'{where}: "track" must be a whole number from 0 to {MAX_TRACK} or null, got '
            f"{_brief(track)}"
        )
    box = face.get("box")
    if not isinstance(box, list) or len(box) != 4 or not all(map(_is_number, box)):
        raise RecordsError(f'{where}: a face needs a "box" of 4 numbers, got {_brief(box)}')
    for key in FACE_NUMBERS:
        if face.get(key) is not None and not _is_number(face[key]):
            raise RecordsError(
                f'{where}: "{key}" must be a number or null, got {_brief(face[key])}'
            )
    if face.get("p_male") is not None and not 0 <= face["p_male"] <= 1:
        raise RecordsError(f'{where}: "p_male" must be from 0 to 1, got {face["p_male"]}')
    if face.get("gender") is not None and not isinstance(face["gender"], str):
        raise RecordsError(f'{where}: "gender" must be text or null, got {_brief(face["gender"])}')
    return track


def load_run(path: Path) -> tuple[RunInfo, list[Person]]:
    """The run and its people (tracks), sorted by first appearance; every field the report
    reads is checked first.

    Raises:
        FileNotFoundError, RecordsError: one line naming the file (and line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"JSON lines file not found: {path}")
    numbered = read_numbered_records(path)
    if not numbered:
        raise RecordsError(f"{path}: no frame records; is it the --json output of agestream run?")
    by_track: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
    for line, record in numbered:
        if abs(record["t_ms"]) > MAX_T_MS:
            raise RecordsError(f'{path}:{line}: "t_ms" is beyond {MAX_T_MS:.0e}: not a run\'s time')
        for face in record["faces"]:
            # Unconfirmed tracks (null) may be false detections: not people yet.
            if face.get("track") is not None:
                by_track[_check_face(face, f"{path}:{line}")].append((record, face))
    records = [record for _, record in numbered]
    start = start_event(path)
    period_s = _frame_period_s(records, start)
    people = [_person(track, seen, period_s) for track, seen in by_track.items()]
    people.sort(key=lambda person: (person.first_s, person.track))
    # Times need not rise line by line (records joined from elsewhere): span them all.
    times = [record["t_ms"] / 1000 for record in records]
    run = RunInfo(
        jsonl=path,
        source=start.get("source") if isinstance(start.get("source"), str) else None,
        frames=len(records),
        start_s=min(times),
        duration_s=max(times) - min(times) + period_s,
    )
    return run, people


def presence_bins(run: RunInfo, people: list[Person]) -> Bins:
    """At most `MAX_BINS` bins of at least 1 s; a person counts in every bin they were seen in."""
    width = max(1.0, run.duration_s / MAX_BINS)
    count = max(1, math.ceil(run.duration_s / width - 1e-9))
    members: list[set[int]] = [set() for _ in range(count)]
    for person in people:
        for t in person.seen_s:
            members[min(count - 1, int((t - run.start_s) // width))].add(person.track)
    return Bins(run.start_s, width, tuple(frozenset(m) for m in members))


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def people_rows(people: list[Person], snapshots: dict[int, str]) -> list[list[str]]:
    """people.csv's rows (the html table shows the same)."""
    return [
        [
            str(p.track),
            _fmt(p.first_s, 3),
            _fmt(p.last_s, 3),
            _fmt(p.duration_s, 3),
            _fmt(p.age, 1),
            _fmt(p.age_uncertainty, 1),
            _fmt(p.age_low, 1),
            _fmt(p.age_high, 1),
            "" if p.age is None else p.age_group,
            p.gender or "",
            _fmt(p.p_male, 3),
            str(p.frames),
            str(p.views),
            str(p.best_frame),
            _fmt(p.best_t_s, 3),
            snapshots.get(p.track, ""),
        ]  # fmt: skip
        for p in people
    ]


def count_columns() -> list[str]:
    groups = [f"age_{group}" for group in (*PERSON_AGE_GROUPS, UNKNOWN)]
    return ["bin_start_s", "bin_end_s", "people", *groups, *SHOWN_GENDERS, "gender_unknown"]


def count_rows(bins: Bins, people: list[Person]) -> list[list[object]]:
    """counts.csv's rows: per bin, people seen, by age group and by gender."""
    by_track = {person.track: person for person in people}
    rows = []
    for i, members in enumerate(bins.people):
        seen = [by_track[track] for track in members]
        groups = [sum(p.age_group == g for p in seen) for g in (*PERSON_AGE_GROUPS, UNKNOWN)]
        genders = [sum(p.gender_key == g for p in seen) for g in (*SHOWN_GENDERS, UNKNOWN)]
        start = bins.start_s + i * bins.width_s
        rows.append([f"{start:.3f}", f"{start + bins.width_s:.3f}", len(seen), *groups, *genders])
    return rows


def read_frames(source: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """The wanted frames (0-based decode order, as the JSON lines number them), decoded in
    one pass: seeking is not frame-exact in every container."""
    capture = cv2.VideoCapture(str(source))
    frames: dict[int, np.ndarray] = {}
    try:
        index, last = 0, max(wanted, default=-1)
        while index <= last:
            ok, frame = capture.read()
            if not ok:
                break
            if index in wanted:
                frames[index] = frame
            index += 1
    finally:
        capture.release()
    return frames


def face_crop(frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """A square around the face (`SNAPSHOT_MARGIN` × its longer side, clipped to the frame),
    enlarged to at least `SNAPSHOT_MIN_PX` so that small faces stay legible."""
    height, width = frame.shape[:2]
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1, 1.0) * SNAPSHOT_MARGIN / 2
    left, right = max(0, int(cx - half)), min(width, int(math.ceil(cx + half)))
    top, bottom = max(0, int(cy - half)), min(height, int(math.ceil(cy + half)))
    if right - left < 2 or bottom - top < 2:
        raise ValueError(f"face box {box} lies outside the {width}x{height} frame")
    crop = frame[top:bottom, left:right]
    shorter = min(crop.shape[:2])
    if shorter < SNAPSHOT_MIN_PX:
        scale = SNAPSHOT_MIN_PX / shorter
        crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return crop


def write_snapshots(directory: Path, people: list[Person], source: Path) -> dict[int, str]:
    """snapshots/person-<id>.jpg of each person's best view; the relative paths by track."""
    frames = read_frames(source, {person.best_frame for person in people})
    folder = directory / "snapshots"
    folder.mkdir(exist_ok=True)
    written = {}
    for person in people:
        frame = frames.get(person.best_frame)
        if frame is None:
            log.warning(
                "no snapshot of person %d: %s has no frame %d (is it the run's source?)",
                person.track, source, person.best_frame,
            )  # fmt: skip
            continue
        try:
            crop = face_crop(frame, person.best_box)
        except ValueError as error:
            log.warning("no snapshot of person %d: %s", person.track, error)
            continue
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise OutputError(f"cannot encode the snapshot of person {person.track}")
        name = f"person-{person.track}.jpg"
        write_whole(folder / name, jpeg.tobytes(), "snapshot")
        written[person.track] = f"snapshots/{name}"
    return written


COLORS = {
    "0-9": "#8dd3c7", "10-19": "#80b1d3", "20-39": "#fdb462", "40-59": "#fb8072",
    "60+": "#bc80bd", "male": "#4c78a8", "female": "#e45756", "unsure": "#b7b7b7",
    UNKNOWN: "#dddddd",
}  # fmt: skip


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _whole_number_ticks(axis: Axis) -> None:
    """Ticks at whole numbers only: the axis counts people."""
    from matplotlib.ticker import MaxNLocator

    locator = axis.get_major_locator()
    assert isinstance(locator, MaxNLocator), "a new axis has an AutoLocator, a MaxNLocator"
    locator.set_params(integer=True)


def presence_chart(bins: Bins, people: list[Person], by: str, title: str) -> bytes:
    """A stacked step chart of the people in view per bin, by "age_group" or "gender_key"."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    by_track = {person.track: person for person in people}
    keys = [*PERSON_AGE_GROUPS, UNKNOWN] if by == "age_group" else [*SHOWN_GENDERS, UNKNOWN]
    counts: dict[str, list[int]] = {key: [] for key in keys}
    for members in bins.people:
        values = [getattr(by_track[track], by) for track in members]
        for key in keys:
            counts[key].append(values.count(key))
    keys = [key for key in keys if any(counts[key])]  # no legend entries for empty groups
    # Each bin's count holds until the bin's end: repeat the last value for a step at the end.
    x = [bins.start_s + i * bins.width_s for i in range(len(bins.people) + 1)]
    figure = Figure(figsize=(8, 3.2))
    axes = figure.add_subplot()
    if keys:
        series = [counts[key] + counts[key][-1:] for key in keys]
        colors = [COLORS[key] for key in keys]
        axes.stackplot(x, *series, labels=keys, colors=colors, step="post")
        axes.legend(loc="upper right", fontsize="small")
    axes.set(title=title, xlabel="time (s)", ylabel="people in view", xlim=(x[0], x[-1]))
    _whole_number_ticks(axes.yaxis)
    figure.tight_layout()
    return _png(figure)


def groups_chart(people: list[Person]) -> bytes:
    """Bars of people per age group, stacked by gender."""
    from matplotlib.figure import Figure

    groups = [*PERSON_AGE_GROUPS] + ([UNKNOWN] if any(p.age is None for p in people) else [])
    figure = Figure(figsize=(8, 3.2))
    axes = figure.add_subplot()
    bottom = np.zeros(len(groups))
    for gender in (*SHOWN_GENDERS, UNKNOWN):
        heights = np.array(
            [sum(p.age_group == g and p.gender_key == gender for p in people) for g in groups]
        )
        if heights.any():
            axes.bar(groups, heights, bottom=bottom, label=gender, color=COLORS[gender])
            bottom += heights
    if bottom.any():
        axes.legend(loc="upper right", fontsize="small")
    axes.set(title=CHARTS[2][1], xlabel="age group", ylabel="people")
    _whole_number_ticks(axes.yaxis)
    figure.tight_layout()
    return _png(figure)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 1em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .5em; text-align: center; }
.card img, .placeholder { width: 160px; height: 160px; object-fit: cover; }
.placeholder { display: flex; align-items: center; justify-content: center; margin: auto;
  background: #eee; color: #666; font-size: .85em; padding: .5em; box-sizing: border-box; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
.charts img { display: block; max-width: 100%; margin: 1em 0; }
"""


def _card(person: Person, snapshot: str | None) -> str:
    if snapshot:
        picture = f'<img src="{html.escape(quote(snapshot))}" alt="person {person.track}">'
    else:
        picture = '<div class="placeholder">no snapshot: run report with --source VIDEO</div>'
    age = "age ?" if person.age is None else f"age {person.age:.0f}"
    if person.age_low is not None and person.age_high is not None:
        age = f"age {person.age_low:.0f}–{person.age_high:.0f}"
    details = (
        f"{age}, {person.gender or 'gender not estimated'}",
        f"{person.first_s:.1f}–{person.last_s:.1f} s ({person.duration_s:.1f} s in view)",
    )
    text = "<br>".join(html.escape(line) for line in details)
    return (
        f'<div class="card">{picture}<div><strong>person {person.track}</strong><br>'
        f"{text}</div></div>"
    )


def index_html(run: RunInfo, people: list[Person], snapshots: dict[int, str]) -> str:
    """The static page: summary, snapshot cards, the people table and the charts."""
    title = html.escape(f"People in {run.source or run.jsonl.name}")
    summary = html.escape(
        f"{len(people)} people, {run.duration_s:.1f} s, {run.frames} frames (from {run.jsonl.name})"
    )
    cards = "\n".join(_card(person, snapshots.get(person.track)) for person in people)
    header = "".join(f"<th>{html.escape(column)}</th>" for column in PEOPLE_COLUMNS)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in people_rows(people, snapshots)
    )
    charts = "\n".join(
        f'<img src="{html.escape(quote(name))}" alt="{html.escape(alt)}">' for name, alt in CHARTS
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}</style></head>
<body>
<h1>{title}</h1>
<p class="summary">{summary}</p>
<h2>People</h2>
<div class="cards">
{cards}
</div>
<h2>Table</h2>
<p><a href="people.csv">people.csv</a> · <a href="counts.csv">counts.csv</a></p>
<table id="people">
<thead><tr>{header}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<h2>Over time</h2>
<div class="charts">
{charts}
</div>
</body></html>
"""


def _snapshot_source(source: Path | None, run: RunInfo) -> Path | None:
    """The video to cut snapshots from: --source, else the file the start event names."""
    if source is not None:
        if not source.is_file():
            raise FileNotFoundError(f"video file not found: {source}; check the path")
        return source
    if run.source and Path(run.source).is_file():
        return Path(run.source)
    log.warning(
        "no snapshots: %s; pass the run's video with --source VIDEO to get them",
        f"source {run.source} is not a readable file" if run.source else "the run names no source",
    )
    return None


def prepare_directory(directory: Path) -> Path:
    """A new partial folder beside `directory`, to be renamed to it when the report is whole;
    refuse a `directory` that holds anything, so nothing is overwritten."""
    if directory.exists():
        if not directory.is_dir():
            raise OutputError(f"report folder {directory} is a file; choose another folder")
        if any(directory.iterdir()):
            raise OutputError(
                f"report folder {directory} is not empty; choose another folder or remove it"
            )
    partial = directory.with_name(f".{directory.name}.{PARTIAL}-{os.getpid()}")
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise failure("report folder", partial, error) from None
    return partial


def _write_files(folder: Path, run: RunInfo, people: list[Person], video: Path | None) -> int:
    """The report's files into `folder`; the number of snapshots."""
    snapshots = write_snapshots(folder, people, video) if video and people else {}
    bins = presence_bins(run, people)
    charts = (
        presence_chart(bins, people, "age_group", CHARTS[0][1]),
        presence_chart(bins, people, "gender_key", CHARTS[1][1]),
        groups_chart(people),
    )
    for (name, _), data in zip(CHARTS, charts):
        write_whole(folder / name, data, "chart")
    rows = people_rows(people, snapshots)
    write_whole(folder / "people.csv", _csv_text(PEOPLE_COLUMNS, rows), "people CSV")
    counts = _csv_text(count_columns(), count_rows(bins, people))
    write_whole(folder / "counts.csv", counts, "counts CSV")
    page = index_html(run, people, snapshots).encode("utf-8")
    write_whole(folder / "index.html", page, "report page")
    return len(snapshots)


def write_people_report(jsonl: Path, directory: Path, source: Path | None = None) -> Report:
    """Everything the report holds, written into a partial folder beside `directory` (new or
    empty) and renamed to it when whole: a report that fails leaves nothing behind."""
    run, people = load_run(jsonl)
    video = _snapshot_source(source, run)
    partial = prepare_directory(directory)
    try:
        snapshots = _write_files(partial, run, people, video)
        os.replace(partial, directory)  # replaces an empty folder, never a full one
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise failure("report folder", directory, error) from None
        raise
    return Report(directory, len(people), snapshots, run)
