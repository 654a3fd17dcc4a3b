"""Face tracking: stable IDs across frames through short misses.

A small IoU tracker with a damped constant-velocity prediction. Faces in a frame
are few and move little between frames, so greedy matching on IoU is as good as
an assignment solver here; tools/compare_trackers.py measures it against
maintained libraries on the shared clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.types import Faces


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

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.missed + 1)


@dataclass(frozen=True)
class TrackUpdate:
    """Result of one tracker step.

    Attributes:
        track_ids: (n,) int64 id per face of the frame, in the faces' order.
        confirmed: (n,) bool, True once a track has been seen `min_hits` times.
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
    """

    def __init__(
        self, fps: float, lifetime_s: float = 1.0, iou_threshold: float = 0.3, min_hits: int = 3
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, but got {fps}")
        if lifetime_s < 0:
            raise ValueError(f"lifetime_s must be >= 0, but got {lifetime_s}")
        if not 0 < iou_threshold < 1:
            raise ValueError(f"iou_threshold must be in (0, 1), but got {iou_threshold}")
        if min_hits < 1:
            raise ValueError(f"min_hits must be >= 1, but got {min_hits}")
        self.max_missed = max(1, round(lifetime_s * fps))
        self.iou_threshold = iou_threshold
        self.min_hits = min_hits
        self._tracks: list[_Track] = []
        self._next_id = 1

    def update(self, faces: Faces) -> TrackUpdate:
        boxes = faces.xyxy.astype(np.float32)
        ids = np.zeros(len(boxes), np.int64)
        confirmed = np.zeros(len(boxes), bool)
        matched_tracks: set[int] = set()
        matched_faces: set[int] = set()
        if self._tracks and len(boxes):
            predicted = np.stack([track.predicted() for track in self._tracks])
            overlaps = iou_matrix(predicted, boxes)
            for flat in np.argsort(-overlaps, axis=None):
                t, f = np.unravel_index(flat, overlaps.shape)
                if overlaps[t, f] < self.iou_threshold:
                    break
                if t in matched_tracks or f in matched_faces:
                    continue
                matched_tracks.add(int(t))
                matched_faces.add(int(f))
                track = self._tracks[t]
                # Damped velocity: enough to follow a walking person, not to overshoot on jitter.
                step = (boxes[f] - track.box) / (track.missed + 1)
                track.velocity = 0.5 * track.velocity + 0.5 * step
                track.box, track.missed = boxes[f], 0
                track.hits += 1
                ids[f], confirmed[f] = track.track_id, track.hits >= self.min_hits
        ended = []
        survivors = []
        for index, track in enumerate(self._tracks):
            if index not in matched_tracks:
                track.missed += 1
                if track.missed > self.max_missed:
                    ended.append(track.track_id)
                    continue
            survivors.append(track)
        for f in range(len(boxes)):
            if f not in matched_faces:
                survivors.append(_Track(self._next_id, boxes[f]))
                ids[f], confirmed[f] = self._next_id, self.min_hits <= 1
                self._next_id += 1
        self._tracks = survivors
        return TrackUpdate(ids, confirmed, tuple(ended))
