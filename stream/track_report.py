"""Per-person summaries built from the frames a run wrote: the rows of the tracks CSV."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stream.types import GENDER_NAMES, FrameResult


@dataclass(frozen=True)
class TrackSummary:
    """What the per-track CSV records for one track."""

    track_id: int
    first_frame: int
    last_frame: int
    first_t_ms: float
    last_t_ms: float
    frames_seen: int
    frames_estimated: int
    age: float
    age_uncertainty: float
    age_low: float
    age_high: float
    gender: str
    p_male: float
    mean_quality: float


@dataclass
class _Entry:
    first_frame: int
    first_t_ms: float
    last_frame: int = 0
    last_t_ms: float = 0.0
    frames_seen: int = 0
    frames_estimated: int = 0
    quality_sum: float = 0.0
    age: float = math.nan
    age_uncertainty: float = math.inf
    age_low: float = math.nan
    age_high: float = math.nan
    gender: str = ""
    p_male: float = math.nan


class TrackLedger:
    """Keeps, for every track, what the written frames showed of it: the summaries agree
    with the video and the JSON lines whichever frame the run stopped at."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def add(self, result: FrameResult) -> None:
        """Account for one written frame."""
        if result.track_ids is None or result.smoothed is None:
            return
        smoothed = result.smoothed
        # Smoothed.__post_init__ fills a missing range with NaN: never None here.
        assert smoothed.age_low is not None and smoothed.age_high is not None
        for i, track_id in enumerate(result.track_ids.tolist()):
            if result.confirmed is not None and not result.confirmed[i]:
                continue  # not shown, so not a person of the run's outputs
            entry = self._entries.setdefault(track_id, _Entry(result.frame.index, result.t_ms))
            entry.last_frame, entry.last_t_ms = result.frame.index, result.t_ms
            entry.frames_seen += 1
            entry.frames_estimated += bool(result.estimated is not None and result.estimated[i])
            entry.quality_sum += float(result.quality[i]) if result.quality is not None else 0.0
            entry.age = float(smoothed.age[i])
            entry.age_uncertainty = float(smoothed.age_uncertainty[i])
            entry.age_low = float(smoothed.age_low[i])
            entry.age_high = float(smoothed.age_high[i])
            entry.p_male = float(smoothed.p_male[i])
            entry.gender = GENDER_NAMES[smoothed.gender[i]] or ""

    def end(self, track_ids: list[int]) -> list[TrackSummary]:
        """Summaries of the tracks that ended (those seen in written frames), forgotten now."""
        return [
            _summary(track_id, self._entries.pop(track_id))
            for track_id in track_ids
            if track_id in self._entries
        ]

    def end_all(self) -> list[TrackSummary]:
        return self.end(list(self._entries))


def _summary(track_id: int, entry: _Entry) -> TrackSummary:
    return TrackSummary(
        track_id=track_id,
        first_frame=entry.first_frame,
        last_frame=entry.last_frame,
        first_t_ms=entry.first_t_ms,
        last_t_ms=entry.last_t_ms,
        frames_seen=entry.frames_seen,
        frames_estimated=entry.frames_estimated,
        age=entry.age,
        age_uncertainty=entry.age_uncertainty,
        age_low=entry.age_low,
        age_high=entry.age_high,
        gender=entry.gender,
        p_male=entry.p_male,
        mean_quality=entry.quality_sum / max(entry.frames_seen, 1),
    )
