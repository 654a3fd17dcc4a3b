"""Per-person report of a run, from its JSON lines, or of a stream's segments (a cluster's
folder of them, one per incarnation) as one run: people.csv, face snapshots cut from the
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import cv2
import numpy as np

from stream.outputs import PARTIAL, OutputError, failure, write_whole
from stream.reports.flicker import RecordsError, read_numbered_records
from stream.reports.segments import (
    SegmentFile,
    find_segments,
    gaps,
    offsets,
    segment_node,
    segment_start_s,
)
from stream.types import PERSON_AGE_GROUPS, SHOWN_GENDERS, person_age_group
from stream.visits import utc_iso

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
    """What the report says about the run as a whole (a folder's: its segments together)."""

    jsonl: Path  # the JSON-lines file, or the folder of a stream's segments
    source: str | None  # as the run's start event names it (a URL is already redacted)
    frames: int
    start_s: float
    duration_s: float  # each frame stands for one frame period
    segments: tuple[Segment, ...] = ()  # in time order; none for one run

    @property
    def unwatched(self) -> list[tuple[float, float]]:
        """The spans between segments when nobody was watched."""
        return gaps([segment.span for segment in self.segments])


@dataclass(frozen=True)
class Segment:
    """One incarnation of a stream in a folder report; person ids restart at each."""

    label: str  # "s1", "s2", ... in time order: its people's ids begin with it
    jsonl: Path
    partial: bool  # its node died, or it is still being written
    node: str | None
    started_s: float | None  # Unix seconds it began; None when nothing says
    offset_s: float  # where its time 0 lies on the report's axis
    run: RunInfo  # its own frames and span, in its own times
    people: int

    @property
    def span(self) -> tuple[float, float]:
        begin = self.offset_s + self.run.start_s
        return begin, begin + self.run.duration_s


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
    segment: str = ""  # its segment's label in a folder report, where ids restart

    @property
    def person_id(self) -> str:
        """The id the report shows: the track, qualified by its segment ("s2-1") if any."""
        return f"{self.segment}-{self.track}" if self.segment else str(self.track)

    @property
    def age_group(self) -> str:
        return UNKNOWN if self.age is None else person_age_group(self.age)

    @property
    def gender_key(self) -> str:
        return self.gender if self.gender in SHOWN_GENDERS else UNKNOWN


@dataclass(frozen=True)
class Bins:
    """Presence over time: per bin, which people (by `Person.person_id`) were seen in it."""

    start_s: float
    width_s: float
    people: tuple[frozenset[str], ...]
    # Spans when nobody was watched (between segments); None: one run, watched throughout.
    unwatched: tuple[tuple[float, float], ...] | None = None


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
    return _run_of(path, numbered, start_event(path))


def _run_of(
    path: Path, numbered: list[tuple[int, dict]], start: dict
) -> tuple[RunInfo, list[Person]]:
    """`load_run` of the frame records read from `path`, after its start event `start`."""
    by_track: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
    for line, record in numbered:
        if abs(record["t_ms"]) > MAX_T_MS:
            raise RecordsError(f'{path}:{line}: "t_ms" is beyond {MAX_T_MS:.0e}: not a run\'s time')
        for face in record["faces"]:
            # Unconfirmed tracks (null) may be false detections: not people yet.
            if face.get("track") is not None:
                by_track[_check_face(face, f"{path}:{line}")].append((record, face))
    records = [record for _, record in numbered]
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


def _shifted(person: Person, offset_s: float, segment: str) -> Person:
    """`person` of a segment on the report's time axis, their id qualified by the segment."""
    return replace(
        person,
        first_s=person.first_s + offset_s,
        last_s=person.last_s + offset_s,
        best_t_s=person.best_t_s + offset_s,
        seen_s=tuple(t + offset_s for t in person.seen_s),
        segment=segment,
    )


def _load_segments(folder: Path) -> list[tuple[SegmentFile, dict, RunInfo, list[Person]]]:
    """Each segment of `folder` with its start event, run and people; a segment without a
    frame record (its node stopped before the first frame) is left out with a warning."""
    loaded = []
    for file in find_segments(folder):
        numbered = read_numbered_records(file.path)
        if not numbered:
            log.warning("%s: no frame records; leaving the segment out", file.path)
            continue
        start = start_event(file.path)
        loaded.append((file, start, *_run_of(file.path, numbered, start)))
    if not loaded:
        raise RecordsError(f"{folder}: none of its segments holds a frame record")
    return loaded


def load_folder(folder: Path) -> tuple[RunInfo, list[Person]]:
    """A stream's segments (`segments.find_segments`) as one run, on one time axis: seconds
    since the first segment began. Each segment's people are distinct people, their ids
    qualified by the segment ("s2-1": person 1 of the second segment).

    Raises:
        FileNotFoundError, RecordsError: one line naming the folder, or the file and line.
    """
    loaded = _load_segments(folder)
    starts = [segment_start_s(file, start) for file, start, _, _ in loaded]
    placed = offsets(starts, [run.start_s + run.duration_s for _, _, run, _ in loaded])
    segments, people = [], []
    in_time_order = sorted(range(len(loaded)), key=lambda index: placed[index])
    for number, i in enumerate(in_time_order, start=1):
        file, start, run, found = loaded[i]
        label = f"s{number}"
        node = segment_node(file, start)
        segments.append(
            Segment(label, file.path, file.partial, node, starts[i], placed[i], run, len(found))
        )
        people += [_shifted(person, placed[i], label) for person in found]
    people.sort(key=lambda person: person.first_s)  # stable: segment, then track on a tie
    begin = min(segment.span[0] for segment in segments)
    sources = {segment.run.source for segment in segments}
    run = RunInfo(
        jsonl=folder.resolve(),  # "." has no name to show
        source=sources.pop() if len(sources) == 1 else None,
        frames=sum(segment.run.frames for segment in segments),
        start_s=begin,
        duration_s=max(segment.span[1] for segment in segments) - begin,
        segments=tuple(segments),
    )
    return run, people


def presence_bins(run: RunInfo, people: list[Person]) -> Bins:
    """At most `MAX_BINS` bins of at least 1 s; a person counts in every bin they were seen in."""
    width = max(1.0, run.duration_s / MAX_BINS)
    count = max(1, math.ceil(run.duration_s / width - 1e-9))
    members: list[set[str]] = [set() for _ in range(count)]
    for person in people:
        for t in person.seen_s:
            members[min(count - 1, int((t - run.start_s) // width))].add(person.person_id)
    unwatched = tuple(run.unwatched) if run.segments else None
    return Bins(run.start_s, width, tuple(frozenset(m) for m in members), unwatched)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def people_rows(people: list[Person], snapshots: dict[str, str]) -> list[list[str]]:
    """people.csv's rows (the html table shows the same)."""
    return [
        [
            p.person_id,
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
            snapshots.get(p.person_id, ""),
        ]  # fmt: skip
        for p in people
    ]


def count_columns(watched: bool = False) -> list[str]:
    """counts.csv's header; `watched`: with the seconds of each bin someone watched (a
    folder report, whose segments may leave gaps)."""
    groups = [f"age_{group}" for group in (*PERSON_AGE_GROUPS, UNKNOWN)]
    columns = ["bin_start_s", "bin_end_s", "people", *groups, *SHOWN_GENDERS, "gender_unknown"]
    return [*columns, "watched_s"] if watched else columns


def _overlap_s(begin: float, end: float, spans: Sequence[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(begin, a)) for a, b in spans)


def count_rows(bins: Bins, people: list[Person]) -> list[list[object]]:
    """counts.csv's rows: per bin, people seen, by age group and by gender (and, with
    `bins.unwatched`, the seconds watched: 0 people in a bin nobody watched is no count)."""
    by_id = {person.person_id: person for person in people}
    rows = []
    for i, members in enumerate(bins.people):
        seen = [by_id[person] for person in members]
        groups = [sum(p.age_group == g for p in seen) for g in (*PERSON_AGE_GROUPS, UNKNOWN)]
        genders = [sum(p.gender_key == g for p in seen) for g in (*SHOWN_GENDERS, UNKNOWN)]
        start, end = bins.start_s + i * bins.width_s, bins.start_s + (i + 1) * bins.width_s
        row: list[object] = [f"{start:.3f}", f"{end:.3f}", len(seen), *groups, *genders]
        if bins.unwatched is not None:
            row.append(f"{bins.width_s - _overlap_s(start, end, bins.unwatched):.3f}")
        rows.append(row)
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


def write_snapshots(directory: Path, people: list[Person], source: Path) -> dict[str, str]:
    """snapshots/person-<id>.jpg of each person's best view; the relative paths by person id.
    `people` are of one run (or segment): `source` is its video."""
    frames = read_frames(source, {person.best_frame for person in people})
    folder = directory / "snapshots"
    folder.mkdir(exist_ok=True)
    written = {}
    for person in people:
        frame = frames.get(person.best_frame)
        if frame is None:
            log.warning(
                "no snapshot of person %s: %s has no frame %d (is it the run's source?)",
                person.person_id, source, person.best_frame,
            )  # fmt: skip
            continue
        try:
            crop = face_crop(frame, person.best_box)
        except ValueError as error:
            log.warning("no snapshot of person %s: %s", person.person_id, error)
            continue
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise OutputError(f"cannot encode the snapshot of person {person.person_id}")
        name = f"person-{person.person_id}.jpg"
        write_whole(folder / name, jpeg.tobytes(), "snapshot")
        written[person.person_id] = f"snapshots/{name}"
    return written


COLORS = {
    "0-9": "#8dd3c7", "10-19": "#80b1d3", "20-39": "#fdb462", "40-59": "#fb8072",
    "60+": "#bc80bd", "male": "#4c78a8", "female": "#e45756", "unsure": "#b7b7b7",
    UNKNOWN: "#dddddd",
}  # fmt: skip
UNWATCHED_COLOR = "#f2f2f2"


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
    """A stacked step chart of the people in view per bin, by "age_group" or "gender_key";
    the spans nobody watched shaded and hatched."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    by_id = {person.person_id: person for person in people}
    keys = [*PERSON_AGE_GROUPS, UNKNOWN] if by == "age_group" else [*SHOWN_GENDERS, UNKNOWN]
    counts: dict[str, list[int]] = {key: [] for key in keys}
    for members in bins.people:
        values = [getattr(by_id[person], by) for person in members]
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
    for i, (begin, end) in enumerate(bins.unwatched or ()):
        label = "not watched" if i == 0 else None
        axes.axvspan(
            begin, end, facecolor=UNWATCHED_COLOR, hatch="//", edgecolor="#bbbbbb", label=label
        )
    if keys or bins.unwatched:
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
        picture = f'<img src="{html.escape(quote(snapshot))}" alt="person {person.person_id}">'
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
        f'<div class="card">{picture}<div><strong>person {html.escape(person.person_id)}'
        f"</strong><br>{text}</div></div>"
    )


SEGMENT_COLUMNS = ("segment", "node", "started (UTC)", "from_s", "to_s", "frames", "people", "file")


def _segment_cells(segment: Segment) -> tuple[str, ...]:
    begin, end = segment.span
    started = "" if segment.started_s is None else utc_iso(segment.started_s, "milliseconds")
    file = segment.jsonl.name + (" (its node stopped, or still written)" if segment.partial else "")
    return (
        segment.label, segment.node or "", started, f"{begin:.1f}", f"{end:.1f}",
        str(segment.run.frames), str(segment.people), file,
    )  # fmt: skip


def _segment_count(run: RunInfo) -> str:
    count = len(run.segments)
    return f"{count} segment{'' if count == 1 else 's'}"


def segments_html(run: RunInfo) -> str:
    """The page's account of a stream's segments: their nodes, spans and the gaps between
    them; nothing for one run."""
    if not run.segments:
        return ""
    header = "".join(f"<th>{html.escape(column)}</th>" for column in SEGMENT_COLUMNS)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _segment_cells(s)) + "</tr>"
        for s in run.segments
    )
    unwatched = "".join(
        f" Nobody was watched from {begin:.1f} to {end:.1f} s ({end - begin:.1f} s)."
        for begin, end in run.unwatched
    )
    note = f"{_segment_count(run)}: the stream was started once"
    if len(run.segments) > 1:
        note = (
            f"{_segment_count(run)}: the stream was started {len(run.segments)} times (a node "
            "stopped and another took it over). Person ids restart at each segment: s2-1 is "
            "person 1 of segment s2, someone else than s1-1"
        )
    note += ". Times are seconds since s1 began."
    return f"""<h2>Segments</h2>
<p class="segments">{html.escape(note + unwatched)}</p>
<table id="segments">
<thead><tr>{header}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
"""


def index_html(run: RunInfo, people: list[Person], snapshots: dict[str, str]) -> str:
    """The static page: summary, segments (a folder's), snapshot cards, the people table and
    the charts."""
    title = html.escape(f"People in {run.source or run.jsonl.name}")
    where = run.jsonl.name + (f": {_segment_count(run)}" if run.segments else "")
    summary = html.escape(
        f"{len(people)} people, {run.duration_s:.1f} s, {run.frames} frames (from {where})"
    )
    cards = "\n".join(_card(person, snapshots.get(person.person_id)) for person in people)
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
{segments_html(run)}<h2>People</h2>
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
        "no snapshots of the people of %s: %s; pass the run's video with --source VIDEO to "
        "get them",
        run.jsonl.name,
        f"source {run.source} is not a readable file" if run.source else "the run names no source",
    )
    return None


def snapshot_sources(source: Path | None, run: RunInfo) -> dict[str, Path | None]:
    """The video to cut snapshots from per segment label ("": the run's own): each
    segment's from its own start event; `source` (--source) for every one when given."""
    if not run.segments:
        return {"": _snapshot_source(source, run)}
    return {segment.label: _snapshot_source(source, segment.run) for segment in run.segments}


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


def _write_files(
    folder: Path, run: RunInfo, people: list[Person], videos: dict[str, Path | None]
) -> int:
    """The report's files into `folder`; the number of snapshots. `videos`: the
    `snapshot_sources`."""
    snapshots: dict[str, str] = {}
    for segment, video in videos.items():
        theirs = [person for person in people if person.segment == segment]
        if video and theirs:
            snapshots.update(write_snapshots(folder, theirs, video))
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
    counts = _csv_text(count_columns(bins.unwatched is not None), count_rows(bins, people))
    write_whole(folder / "counts.csv", counts, "counts CSV")
    page = index_html(run, people, snapshots).encode("utf-8")
    write_whole(folder / "index.html", page, "report page")
    return len(snapshots)


def write_people_report(jsonl: Path, directory: Path, source: Path | None = None) -> Report:
    """Everything the report holds, written into a partial folder beside `directory` (new or
    empty) and renamed to it when whole: a report that fails leaves nothing behind.

    `jsonl`: a run's JSON lines, or a stream's folder of segments (`load_folder`); `source`:
    the video to cut snapshots from, for every segment of a folder."""
    run, people = load_folder(jsonl) if jsonl.is_dir() else load_run(jsonl)
    videos = snapshot_sources(source, run)
    partial = prepare_directory(directory)
    try:
        snapshots = _write_files(partial, run, people, videos)
        os.replace(partial, directory)  # replaces an empty folder, never a full one
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise failure("report folder", directory, error) from None
        raise
    return Report(directory, len(people), snapshots, run)
