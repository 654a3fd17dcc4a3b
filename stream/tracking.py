"""Face tracking: stable IDs across frames through short misses.

A small IoU tracker with a damped constant-velocity prediction. Faces in a frame
are few and move little between frames, so greedy matching on IoU is as good as
an assignment solver here; tools/compare_trackers.py measures it against
maintained libraries on the shared clips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stream.types import Faces

# Second-look scores averaged to confirm a track: a third of a second at 30 FPS.
LIKENESS_WINDOW = 10


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) intersection over union of xyxy boxes."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return intersection / np.maximum(area_a[:, None] + area_b[None, :] - intersection, 1e-9)


@dataclass
class _Track:
    track_id: int
    box: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    hits: int = 1
    missed: int = 0
    # The latest second-look face scores, at most LIKENESS_WINDOW of them.
    likeness: list[float] = field(default_factory=list)
    confirmed: bool = False

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.missed + 1)


@dataclass(frozen=True)
class TrackUpdate:
    """Result of one tracker step.

    Attributes:
        track_ids: (n,) int64 id per face of the frame, in the faces' order.
        confirmed: (n,) bool, True once a track has been seen `min_hits` times and passed
            its face checks; never False again for that track.
        ended: ids of tracks that went unseen for longer than the lifetime.
    """

    track_ids: np.ndarray
    confirmed: np.ndarray
    ended: tuple[int, ...]


class Tracker:
    """IoU tracker whose track lifetime is given in seconds and scaled by the source FPS.

    Each tracker owns its ID counter, so two sources never share or skip IDs.

    Args:
        fps: frame rate of the source, to turn `lifetime_s` into frames.
        lifetime_s: how long a track survives without a detection.
        iou_threshold: least IoU between a track's predicted box and a detection to match.
        min_hits: detections before a track counts as confirmed.
        face_check_score: least mean face likeness (see `update`) over a track's latest
            LIKENESS_WINDOW detections to confirm it (0: no check): an average, so that a
            lucky score now and then does not confirm a lasting false detection.
    """

    def __init__(
        self,
        fps: float,
        lifetime_s: float = 1.0,
        iou_threshold: float = 0.3,
        min_hits: int = 3,
        face_check_score: float = 0.0,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, but got {fps}")
        if lifetime_s < 0:
            raise ValueError(f"lifetime_s must be >= 0, but got {lifetime_s}")
        if not 0 < iou_threshold < 1:
            raise ValueError(f"iou_threshold must be in (0, 1), but got {iou_threshold}")
        if min_hits < 1:
            raise ValueError(f"min_hits must be >= 1, but got {min_hits}")
        if not 0 <= face_check_score < 1:
            raise ValueError(f"face_check_score must be in [0, 1), but got {face_check_score}")
        self.face_check_score = face_check_score
        self.max_missed = max(1, round(lifetime_s * fps))
        self.iou_threshold = iou_threshold
        self.min_hits = min_hits
        self._tracks: list[_Track] = []
        self._next_id = 1

    def update(
        self, faces: Faces, face_likeness: Callable[[Faces], np.ndarray] | None = None
    ) -> TrackUpdate:
        """Match the frame's faces to tracks. `face_likeness` takes the faces of tracks not
        yet confirmed and scores (0..1) how much each looks like a face on a second look;
        it is called only when `face_check_score` is set."""
        boxes = faces.xyxy.astype(np.float32)
        tracks_of_faces, ended = self._match(boxes)
        pending = np.array([not track.confirmed for track in tracks_of_faces], bool)
        likeness = np.ones(len(boxes), np.float32)
        if face_likeness is not None and self.face_check_score > 0 and pending.any():
            likeness[pending] = face_likeness(faces[pending])
        for track, score in zip(tracks_of_faces, likeness.tolist()):
            if not track.confirmed:
                track.likeness = (track.likeness + [score])[-LIKENESS_WINDOW:]
                track.confirmed = track.hits >= self.min_hits and (
                    sum(track.likeness) / len(track.likeness) >= self.face_check_score
                )
        return TrackUpdate(
            np.array([track.track_id for track in tracks_of_faces], np.int64),
            np.array([track.confirmed for track in tracks_of_faces], bool),
            ended,
        )

    def _match(self, boxes: np.ndarray) -> tuple[list[_Track], tuple[int, ...]]:
        """Each box's track (continued or new) and the ids of the tracks that ended."""
        of_face: list[_Track | None] = [None] * len(boxes)
        matched_tracks: set[int] = set()
        if self._tracks and len(boxes):
            predicted = np.stack([track.predicted() for track in self._tracks])
            overlaps = iou_matrix(predicted, boxes)
            for flat in np.argsort(-overlaps, axis=None):
                t, f = np.unravel_index(flat, overlaps.shape)
                if overlaps[t, f] < self.iou_threshold:
                    break
                if t in matched_tracks or of_face[f] is not None:
                    continue
                matched_tracks.add(int(t))
                track = of_face[f] = self._tracks[t]
                # Damped velocity: enough to follow a walking person, not to overshoot on jitter.
                step = (boxes[f] - track.box) / (track.missed + 1)
                track.velocity = 0.5 * track.velocity + 0.5 * step
                track.box, track.missed = boxes[f], 0
                track.hits += 1
        ended = []
        survivors = []
        for index, track in enumerate(self._tracks):
            if index not in matched_tracks:
                track.missed += 1
                if track.missed > self.max_missed:
                    ended.append(track.track_id)
                    continue
            survivors.append(track)
        for f, track in enumerate(of_face):
            if track is None:
                track = of_face[f] = _Track(self._next_id, boxes[f])
                self._next_id += 1
                survivors.append(track)
        self._tracks = survivors
        return of_face, tuple(ended)
