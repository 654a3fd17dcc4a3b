"""Label flicker and identity checks of a run, from its JSON lines: how often each track's
displayed age group and gender change per second (raw per-frame estimates against smoothed
ones), how often its raw estimates contradict its label, and which tracks span a shot cut."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from math import isfinite
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# The age groups of the FairFace ViT model card (seed 000): 0-2, 3-9, 10-19, ..., 70+.
AGE_GROUP_EDGES = (0, 3, 10, 20, 30, 40, 50, 60, 70)
SHORT_TRACK_S = 1.0
# A raw age this far from the track's shown age (years, or this share of the shown age if
# more) contradicts it: further than one person's estimates stray between views.
DISAGREE_AGE_YEARS, DISAGREE_AGE_SHARE = 10.0, 0.4
# A raw P(male) this far beyond 0.5 on the other side of the shown gender contradicts it.
DISAGREE_P_MALE = 0.3
# A track with at least this many estimated views, this share of them contradicting its
# label, probably holds more than one person.
SUSPECT_MIN_VIEWS, SUSPECT_SHARE = 5, 0.3


def age_group_index(age: float) -> int:
    return int(np.searchsorted(AGE_GROUP_EDGES, age, side="right")) - 1


def label_changes(labels: list[object]) -> int:
    """Changes between consecutive known labels (None, a frame not estimated, is skipped)."""
    known = [label for label in labels if label is not None]
    return sum(a != b for a, b in zip(known, known[1:]))


@dataclass(frozen=True)
class TrackFlicker:
    track: int
    frames: int
    seconds: float
    age_changes_raw: int
    age_changes_smoothed: int
    gender_changes_raw: int
    gender_changes_smoothed: int
    unsure_changes: int
    estimated_views: int
    disagreeing_views: int
    cuts_spanned: int

    @property
    def disagreeing_share(self) -> float:
        return self.disagreeing_views / self.estimated_views if self.estimated_views else 0.0

    @property
    def suspect(self) -> bool:
        """Whether the track probably holds more than one person."""
        return self.estimated_views >= SUSPECT_MIN_VIEWS and self.disagreeing_share >= SUSPECT_SHARE


def disagrees(face: dict) -> bool | None:
    """Whether a face's raw estimate contradicts its shown label; None when not estimated."""
    age, raw_age = face.get("age"), face.get("age_raw")
    p_male_raw, gender = face.get("p_male_raw"), face.get("gender")
    if raw_age is None and p_male_raw is None:
        return None
    if age is not None and raw_age is not None:
        if abs(raw_age - age) > max(DISAGREE_AGE_YEARS, DISAGREE_AGE_SHARE * age):
            return True
    if p_male_raw is not None and gender in ("male", "female"):
        towards_male = p_male_raw - 0.5
        if (towards_male if gender == "female" else -towards_male) > DISAGREE_P_MALE:
            return True
    return False


class RecordsError(ValueError):
    """A JSON-lines file that cannot be read as a run's records; names the file and line."""


def _frame_record(text: str, where: str) -> dict | None:
    """The frame record of one line (None for an event line), or RecordsError naming it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordsError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise RecordsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "faces" not in record:
        return None
    faces = record["faces"]
    if not isinstance(faces, list) or not all(isinstance(face, dict) for face in faces):
        raise RecordsError(f'{where}: "faces" must be a list of objects')
    for key in ("frame", "t_ms"):
        value = record.get(key)
        # json reads NaN and Infinity, which agestream never writes.
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not isfinite(value):
            raise RecordsError(f'{where}: a frame record needs a finite number "{key}"')
    return record


def read_numbered_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, frame record) of a run's JSON-lines file; event lines (no "faces") are
    ignored. A partial last line (what a killed run leaves) is skipped with a warning.

    Raises:
        RecordsError: naming the file and line of the first malformed record.
    """
    with path.open(encoding="utf-8", errors="replace") as file:
        lines = file.read().split("\n")
    # Text after the last newline is a line the writer did not finish.
    complete, tail = lines[:-1], lines[-1]
    records = []
    for number, text in enumerate(complete, start=1):
        if text.strip():
            record = _frame_record(text, f"{path}:{number}")
            if record is not None:
                records.append((number, record))
    if tail.strip():
        try:
            record = _frame_record(tail, f"{path}:{len(lines)}")
        except RecordsError as error:
            log.warning("%s; skipping it as the partial last line of an interrupted run", error)
        else:
            if record is not None:
                records.append((len(lines), record))
    return records


def read_records(path: Path) -> list[dict]:
    """The frame records of `read_numbered_records`, without their line numbers."""
    return [record for _, record in read_numbered_records(path)]


def track_flicker(records: list[dict]) -> list[TrackFlicker]:
    """One row per track id of the records."""
    times = np.array([record["t_ms"] for record in records], dtype=float)
    cut_frames = [record["frame"] for record in records if record.get("cut")]
    frame_ms = float(np.median(np.diff(times))) if len(times) > 1 else 1000 / 30
    faces_by_track: dict[int, list[tuple[float, dict]]] = defaultdict(list)
    frames_by_track: dict[int, list[int]] = defaultdict(list)
    for record in records:
        for face in record["faces"]:
            if face.get("track") is not None:
                faces_by_track[face["track"]].append((record["t_ms"], face))
                frames_by_track[face["track"]].append(record["frame"])
    rows = []
    for track, seen in sorted(faces_by_track.items()):
        faces = [face for _, face in seen]
        first, last = frames_by_track[track][0], frames_by_track[track][-1]
        verdicts = [verdict for verdict in map(disagrees, faces) if verdict is not None]

        def group(age: float | None) -> int | None:
            return None if age is None else age_group_index(age)

        def gender(p_male: float | None) -> bool | None:
            return None if p_male is None else p_male >= 0.5

        def decided(label: str | None) -> str | None:
            return None if label == "unsure" else label

        rows.append(
            TrackFlicker(
                track=track,
                frames=len(seen),
                # Each frame stands for one frame period, so a one-frame track lasts one period.
                seconds=(seen[-1][0] - seen[0][0] + frame_ms) / 1000,
                age_changes_raw=label_changes([group(f.get("age_raw")) for f in faces]),
                age_changes_smoothed=label_changes([group(f["age"]) for f in faces]),
                gender_changes_raw=label_changes([gender(f.get("p_male_raw")) for f in faces]),
                # Male to female or back (through "unsure" or not): what contradicts itself.
                gender_changes_smoothed=label_changes([decided(f["gender"]) for f in faces]),
                unsure_changes=label_changes([f["gender"] == "unsure" for f in faces]),
                estimated_views=len(verdicts),
                disagreeing_views=sum(verdicts),
                cuts_spanned=sum(first < cut <= last for cut in cut_frames),
            )
        )
    return rows


def flicker_report(path: Path) -> dict:
    """Per-track flicker and totals: changes per track-second, raw and smoothed."""
    records = read_records(path)
    rows = track_flicker(records)
    seconds = sum(row.seconds for row in rows)

    def rate(name: str) -> float:
        return sum(getattr(row, name) for row in rows) / seconds if seconds else 0.0

    return {
        "file": str(path),
        "tracks": len(rows),
        "short_tracks": sum(row.seconds < SHORT_TRACK_S for row in rows),
        "track_seconds": round(seconds, 3),
        "age_group_changes_per_s": {
            "raw": rate("age_changes_raw"),
            "smoothed": rate("age_changes_smoothed"),
        },
        "gender_changes_per_s": {
            "raw": rate("gender_changes_raw"),
            "smoothed": rate("gender_changes_smoothed"),
        },
        "unsure_changes_per_s": rate("unsure_changes"),
        "cuts": sum(bool(record.get("cut")) for record in records),
        "suspect_tracks": [row.track for row in rows if row.suspect],
        "tracks_across_cuts": [row.track for row in rows if row.cuts_spanned],
        "per_track": [
            asdict(row) | {"disagreeing_share": round(row.disagreeing_share, 3)} for row in rows
        ],
    }


def compare_runs(path: Path, reference: Path) -> dict:
    """Smoothed labels of two runs of one clip (e.g. with and without skipping estimates),
    face by face: same frame, same track id (detection and tracking are deterministic)."""

    def faces(file: Path) -> dict[tuple[int, int], dict]:
        return {
            (record["frame"], face["track"]): face
            for record in read_records(file)
            for face in record["faces"]
            if face.get("track") is not None and face.get("age") is not None
        }

    ours, theirs = faces(path), faces(reference)
    shared = [key for key in ours if key in theirs]
    age_diff = np.array([abs(ours[k]["age"] - theirs[k]["age"]) for k in shared])
    return {
        "faces_compared": len(shared),
        "mean_abs_age_diff": float(age_diff.mean()) if shared else float("nan"),
        "gender_agreement": float(
            np.mean([ours[k]["gender"] == theirs[k]["gender"] for k in shared])
        )
        if shared
        else float("nan"),
    }


def format_flicker(report: dict) -> str:
    """The report as text: a header line, one row per track (frames, seconds, and the number
    of changes of its age group and of its gender, raw and smoothed, and of the smoothed label
    into or out of "unsure", the share of its estimated views whose raw estimate contradicts
    its label, and the shot cuts it spans), then the rates and the tracks to look at."""
    age, gender = report["age_group_changes_per_s"], report["gender_changes_per_s"]
    lines = [
        f"{report['file']}: {report['tracks']} track IDs, {report['short_tracks']} shorter than "
        f"{SHORT_TRACK_S:.0f} s, {report['track_seconds']:.1f} track-seconds",
        f"{'track':>5} {'frames':>6} {'seconds':>7} {'age raw':>7} {'age smoothed':>12}"
        f" {'gender raw':>10} {'gender smoothed':>15} {'unsure':>6} {'contradicting':>13}"
        f" {'cuts':>4}",
    ]
    for row in report["per_track"]:
        lines.append(
            f"{row['track']:>5} {row['frames']:>6} {row['seconds']:>7.1f}"
            f" {row['age_changes_raw']:>7} {row['age_changes_smoothed']:>12}"
            f" {row['gender_changes_raw']:>10} {row['gender_changes_smoothed']:>15}"
            f" {row['unsure_changes']:>6}"
            f" {row['disagreeing_views']:>4} of {row['estimated_views']:<5}"
            f" {row['cuts_spanned']:>4}"
        )
    lines.append(
        f"changes per track-second: age group raw {age['raw']:.3f}, smoothed {age['smoothed']:.3f};"
        f" gender raw {gender['raw']:.3f}, smoothed {gender['smoothed']:.3f}"
        f" (and {report['unsure_changes_per_s']:.3f} into or out of unsure)"
    )
    lines.extend(_identity_lines(report))
    return "\n".join(lines)


def _identity_lines(report: dict) -> list[str]:
    """What says a track may hold more than one person."""
    lines = [f"shot cuts: {report['cuts']}"]
    if report["suspect_tracks"]:
        lines.append(
            f"tracks whose raw estimates contradict their label in >= {SUSPECT_SHARE:.0%} of"
            f" views (more than one person?): {', '.join(map(str, report['suspect_tracks']))}"
        )
    if report["tracks_across_cuts"]:
        lines.append(
            "tracks on both sides of a cut (the same person re-identified, or two people):"
            f" {', '.join(map(str, report['tracks_across_cuts']))}"
        )
    return lines
