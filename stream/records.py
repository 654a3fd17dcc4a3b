"""What a face is labelled as and the records written and served of it: the label rules (shown
age, its range, gender and the gender's confidence), the JSON-lines records of frames, source
events and starts, and the live page's people in view."""

from __future__ import annotations

import math

from stream.config import package_version
from stream.outputs import json_number
from stream.sources import SourceEvent
from stream.types import GENDER_NAMES, AnnotatedFrame, FrameResult, StreamStart, TrackStatus
from stream.visits import utc_iso


def gender_confidence(gender: str | None, p_male: float) -> float | None:
    """The shown gender's probability (p_male, or 1 - p_male); None when no gender is shown."""
    if gender == "male":
        return p_male
    return 1.0 - p_male if gender == "female" else None


def shown_age_range(result: FrameResult, i: int) -> tuple[float, float]:
    """Face `i`'s 80 % age range as shown: its track's, or its own estimate's without
    tracking; NaN without one."""
    smoothed = result.smoothed
    if smoothed is not None and smoothed.age_low is not None and smoothed.age_high is not None:
        return float(smoothed.age_low[i]), float(smoothed.age_high[i])
    if result.estimates.age_low is not None and result.estimates.age_high is not None:
        return float(result.estimates.age_low[i]), float(result.estimates.age_high[i])
    return math.nan, math.nan


def face_label_state(result: FrameResult, i: int) -> tuple[float, float, str | None]:
    """Face `i`'s shown age, p_male and gender ("male", "female", "unsure", or None for an
    estimator without gender): the smoothed track's where tracking ran; else (a result without
    tracking, as `bench`'s naive loop makes) the raw estimate's side of 0.5."""
    if result.smoothed is None:
        p_male = float(result.estimates.p_male[i])
        gender = None if math.isnan(p_male) else ("male" if p_male >= 0.5 else "female")
        return float(result.estimates.age[i]), p_male, gender
    smoothed = result.smoothed
    return float(smoothed.age[i]), float(smoothed.p_male[i]), GENDER_NAMES[smoothed.gender[i]]


def frame_record(result: FrameResult) -> dict:
    """The JSON-lines record of one frame: smoothed values where tracking ran, with the
    frame's raw estimate beside them (null where the face was not estimated this frame). A
    face whose track is not confirmed has no track, age or gender: it is not shown either."""
    raw = result.estimates
    faces = []
    for i, (box, score) in enumerate(zip(result.faces.xyxy, result.faces.score)):
        shown = result.confirmed is None or bool(result.confirmed[i])
        age, p_male, gender = face_label_state(result, i) if shown else (math.nan,) * 2 + (None,)
        face = {
            "box": [round(float(v), 1) for v in box],
            "score": round(float(score), 4),
            "track": int(result.track_ids[i]) if result.track_ids is not None and shown else None,
            "age": json_number(age, 2),
            "gender": gender,
            "p_male": json_number(p_male, 4),
        }
        low, high = shown_age_range(result, i) if shown else (math.nan, math.nan)
        face["age_low"], face["age_high"] = json_number(low, 1), json_number(high, 1)
        if result.smoothed is not None:
            uncertainty = result.smoothed.age_uncertainty[i] if shown else math.nan
            face["age_uncertainty"] = json_number(uncertainty, 2)
            # This frame's own 80 % range; null for estimators without one.
            face["age_low_raw"] = face["age_high_raw"] = None
            if raw.age_low is not None and raw.age_high is not None:
                face["age_low_raw"] = json_number(raw.age_low[i], 1)
                face["age_high_raw"] = json_number(raw.age_high[i], 1)
            face["age_raw"] = json_number(raw.age[i], 2)
            face["p_male_raw"] = json_number(raw.p_male[i], 4)
            # The spread of this frame's age distribution; null for estimators without one.
            face["age_std_raw"] = None if raw.age_std is None else json_number(raw.age_std[i], 2)
        if result.quality is not None:
            face["quality"] = round(float(result.quality[i]), 4)
        faces.append(face)
    record = {"frame": result.frame.index, "t_ms": round(result.t_ms, 3), "faces": faces}
    if result.cut:
        record["cut"] = True  # a new shot: no track continues into it
    return record


def event_record(event: SourceEvent, t_ms: float) -> dict:
    """The JSON-lines record of a source event at `t_ms` on the frames' clock."""
    record: dict = {"event": event.kind, "t_ms": round(t_ms, 3), "attempt": event.attempt}
    if event.down_s is not None:
        record["down_ms"] = round(event.down_s * 1000.0, 1)
    return record


def start_record(stream: StreamStart) -> dict:
    """The JSON-lines file's first record: what was run on what (`agestream report` finds the
    video for its snapshots here)."""
    info = stream.info
    record: dict = {
        "event": "start",
        "t_ms": 0.0,
        "source": stream.source,
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 3),
        "is_file": info.is_file,
        "estimator": stream.estimator,
        "agestream": package_version(),
    }
    if stream.node is not None:  # a segment of a cluster stream: where and when it ran
        record |= {"node": stream.node, "started": utc_iso(stream.wall_start, "milliseconds")}
    return record


def moved_record(stream: StreamStart) -> dict:
    """The record after the start record of a cluster stream restarted on another node: its
    person ids start over here."""
    return {"event": "moved", "t_ms": 0.0, "from_node": stream.moved_from, "node": stream.node}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def track_statuses(result: FrameResult, since_ms: dict[int, float]) -> tuple[TrackStatus, ...]:
    """The confirmed people of `result`; `since_ms` maps a person to when it was confirmed."""
    if result.track_ids is None:
        return ()
    tracks = []
    for i, person in enumerate(result.track_ids):
        if result.confirmed is not None and not result.confirmed[i]:
            continue
        age, p_male, gender = face_label_state(result, i)
        uncertainty = math.inf if result.smoothed is None else result.smoothed.age_uncertainty[i]
        confidence = gender_confidence(gender, p_male)
        low, high = shown_age_range(result, i)
        tracks.append(
            TrackStatus(
                track=int(person),
                age=_finite(age),
                age_uncertainty=_finite(float(uncertainty)),
                age_low=_finite(low),
                age_high=_finite(high),
                gender=gender,
                confidence=None if confidence is None else _finite(confidence),
                seconds_in_view=round(
                    (result.t_ms - since_ms.get(int(person), result.t_ms)) / 1000, 2
                ),
            )
        )
    return tuple(tracks)


def people_in_view(frame: AnnotatedFrame, since_ms: dict[int, float]) -> tuple[TrackStatus, ...]:
    """The confirmed people of `frame` as `track_statuses` gives them, after keeping `since_ms`
    (when each person in view was first confirmed) up to date: those who left with the frame
    are dropped, those new to it added."""
    result = frame.result
    for person in frame.left:
        since_ms.pop(person, None)
    if result.track_ids is not None:
        for i, person in enumerate(result.track_ids):
            if result.confirmed is None or result.confirmed[i]:
                since_ms.setdefault(int(person), result.t_ms)
    return track_statuses(result, since_ms)
