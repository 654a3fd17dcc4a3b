"""Face tracking: stable IDs across frames through short misses, one person per track.

A small IoU tracker with a damped constant-velocity prediction, which ends its tracks at a
shot cut and splits a track whose face stops matching its identity signature. Faces in a frame
are few and move little between frames, so greedy matching on IoU is as good as
an assignment solver here; tools/compare_trackers.py measures it against
maintained libraries on the shared clips.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stream.face_id import face_distance
from stream.types import Faces

log = logging.getLogger(__name__)

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


# A track whose identity check found no usable view tries again after this many frames.
IDENTITY_RETRY_FRAMES = 3
# A track followed without a miss is one person unless its face disagrees by this much more
# than `identity_distance`: people rarely swap places between two frames, while a hand, a
# microphone or motion blur over a face moves its descriptor (hamilton's singer: 0.40-0.45).
CONTINUOUS_MARGIN = 0.1
# A face box whose colours change this much (one minus the Bhattacharyya coefficient of
# stream.cuts.face_looks) from one detection to the next is checked at once, as after a miss:
# real faces change by at most 0.024 a frame on the shared clips, a face put in another's
# place by ~0.12.
LOOK_CHANGE = 0.05


def identity_distance(signature: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """(k,) `face_distance` between a face signature (a sum of unit descriptors, normalized
    here) and (k, d) unit descriptors: 0 the same face, about 0.4 dlib's one-person limit."""
    unit = signature / max(float(np.linalg.norm(signature)), 1e-9)
    return face_distance(unit[None], descriptors)[0]


@dataclass(eq=False)
class _Track:
    track_id: int
    box: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    hits: int = 1
    missed: int = 0
    # Matched this frame after frames without a detection, or with the colours of its box
    # changed at once: someone else may have stepped in.
    reacquired: bool = False
    look: np.ndarray | None = None
    # The latest second-look face scores, at most LIKENESS_WINDOW of them.
    likeness: list[float] = field(default_factory=list)
    # Detections and face checks passed: the track is a face, its identity not yet known.
    ready_since: int | None = None
    confirmed: bool = False
    # Sum of the unit face descriptors of the views that agreed; None until one is usable.
    signature: np.ndarray | None = None
    checked_at: int = -(10**9)
    # A descriptor that disagreed with the signature, and the distance it was held to: the
    # next frame's check decides (a split needs two disagreeing views in a row); meanwhile
    # the face is not shown as the track's person.
    doubt: np.ndarray | None = None
    doubt_limit: float = 0.0

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.missed + 1)

    def unit_signature(self, dimensions: int) -> np.ndarray:
        if self.signature is None:
            return np.full(dimensions, np.nan, np.float32)
        return self.signature / max(float(np.linalg.norm(self.signature)), 1e-9)


@dataclass(frozen=True)
class TrackUpdate:
    """Result of one tracker step.

    Attributes:
        track_ids: (n,) int64 id per face of the frame, in the faces' order.
        confirmed: (n,) bool, True once a track has been seen `min_hits` times, passed its
            face checks and its face identity is known (or no usable view came within
            `identity_wait`); False again only for a frame whose face disagreed with the
            track's identity, until the next view decides (no label carried over meanwhile).
        ended: ids of tracks that ended: unseen for longer than the lifetime, at a cut, or
            split because another person's face took their place.
        signatures: (n, d) float32 unit face signature of each face's track, NaN rows where
            it has none (d = 0 when identity checks are off).
        cut: whether this frame started a new shot (every earlier track ended).
        split: ids of the tracks among `ended` that a different face took over.
    """

    track_ids: np.ndarray
    confirmed: np.ndarray
    ended: tuple[int, ...]
    signatures: np.ndarray
    cut: bool = False
    split: tuple[int, ...] = ()


class Tracker:
    """IoU tracker whose tracks each hold one person: a cut ends them all, and a face whose
    identity disagrees with its track's starts a track of its own.

    Track lifetime is given in seconds and scaled by the source FPS. Each tracker owns its
    ID counter, so two sources never share or skip IDs.

    Args:
        fps: frame rate of the source, to turn `lifetime_s` into frames.
        lifetime_s: how long a track survives without a detection.
        iou_threshold: least IoU between a track's predicted box and a detection to match.
        min_hits: detections before a track counts as confirmed.
        face_check_score: least mean face likeness (see `update`) over a track's latest
            LIKENESS_WINDOW detections to confirm it (0: no check): an average, so that a
            lucky score now and then does not confirm a lasting false detection.
        identity_distance: a face further than this from its track's signature (see
            `identity_distance`) is someone else; 0 turns identity checks off.
        identity_every: frames between identity checks of a confirmed track that is seen
            continuously (a track seen again after a miss is checked at once).
        identity_wait: frames a track that is ready waits for a usable view of its face
            before it is confirmed without one.
    """

    def __init__(
        self,
        fps: float,
        lifetime_s: float = 1.0,
        iou_threshold: float = 0.3,
        min_hits: int = 3,
        face_check_score: float = 0.0,
        identity_distance: float = 0.0,
        identity_every: int = 15,
        identity_wait: int = 15,
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
        if not 0 <= identity_distance < 2:
            raise ValueError(f"identity_distance must be in [0, 2), but got {identity_distance}")
        if identity_every < 1 or identity_wait < 0:
            raise ValueError(
                f"identity_every must be >= 1 and identity_wait >= 0, but got {identity_every} "
                f"and {identity_wait}"
            )
        self.face_check_score = face_check_score
        self.max_missed = max(1, round(lifetime_s * fps))
        self.iou_threshold = iou_threshold
        self.min_hits = min_hits
        self.identity_threshold = identity_distance
        self.identity_every = identity_every
        self.identity_wait = identity_wait
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._step = 0
        self._dimensions = 0

    def update(
        self,
        faces: Faces,
        face_likeness: Callable[[Faces], np.ndarray] | None = None,
        face_identity: Callable[[Faces], np.ndarray] | None = None,
        cut: bool = False,
        looks: np.ndarray | None = None,
    ) -> TrackUpdate:
        """Match the frame's faces to tracks.

        Args:
            faces: the frame's detections.
            face_likeness: scores (0..1) how much each of the given faces (those of tracks
                not yet confirmed) looks like a face on a second look; called only when
                `face_check_score` is set.
            face_identity: (k, d) unit face descriptors of the given faces, NaN rows where
                the view is unusable (a profile, a tiny face); called only when
                `identity_distance` is set, for the faces due a check.
            cut: the frame starts a new shot: every track ends before matching.
            looks: (n, k) colour histograms of the face boxes (stream.cuts.face_looks), to
                check a face at once when its box's colours change suddenly.
        """
        self._step += 1
        cut_ended = tuple(track.track_id for track in self._tracks) if cut else ()
        if cut:
            self._tracks = []
        boxes = faces.xyxy.astype(np.float32)
        tracks_of_faces, ended = self._match(boxes)
        if looks is not None:
            self._compare_looks(tracks_of_faces, looks)
        self._check_faces(faces, tracks_of_faces, face_likeness)
        split: tuple[int, ...] = ()
        if face_identity is not None and self.identity_threshold > 0:
            split = self._check_identities(faces, tracks_of_faces, face_identity)
        self._confirm(tracks_of_faces)
        return TrackUpdate(
            np.array([track.track_id for track in tracks_of_faces], np.int64),
            np.array([t.confirmed and t.doubt is None for t in tracks_of_faces], bool),
            cut_ended + ended + split,
            self._signatures(tracks_of_faces),
            cut,
            split,
        )

    @staticmethod
    def _compare_looks(tracks: list[_Track], looks: np.ndarray) -> None:
        for track, look in zip(tracks, looks):
            if track.look is not None and 1.0 - float(look @ track.look) > LOOK_CHANGE:
                track.reacquired = True
            track.look = look

    def _check_faces(
        self,
        faces: Faces,
        tracks: list[_Track],
        face_likeness: Callable[[Faces], np.ndarray] | None,
    ) -> None:
        """Second-look scores for tracks not yet ready; ready once min_hits and the mean
        score are reached."""
        pending = np.array([track.ready_since is None for track in tracks], bool)
        likeness = np.ones(len(tracks), np.float32)
        if face_likeness is not None and self.face_check_score > 0 and pending.any():
            likeness[pending] = face_likeness(faces[pending])
        for track, score in zip(tracks, likeness.tolist()):
            if track.ready_since is None:
                track.likeness = (track.likeness + [score])[-LIKENESS_WINDOW:]
                if track.hits >= self.min_hits and (
                    sum(track.likeness) / len(track.likeness) >= self.face_check_score
                ):
                    track.ready_since = self._step

    def _due(self, track: _Track) -> bool:
        """Whether a track's face is checked this frame."""
        if track.ready_since is None:
            return False
        since = self._step - track.checked_at
        if track.signature is None:
            return since >= IDENTITY_RETRY_FRAMES
        if track.doubt is not None:
            return True
        return track.confirmed and (track.reacquired or since >= self.identity_every)

    def _check_identities(
        self,
        faces: Faces,
        tracks: list[_Track],
        face_identity: Callable[[Faces], np.ndarray],
    ) -> tuple[int, ...]:
        """Face descriptors of the tracks due a check: the first usable one becomes the
        signature, one that agrees joins it; two in a row that disagree move the face to a
        new track (and end the old one). Returns the ids of the tracks ended that way."""
        due = np.array([self._due(track) for track in tracks], bool)
        if not due.any():
            return ()
        descriptors = np.asarray(face_identity(faces[due]), np.float32)
        self._dimensions = descriptors.shape[1]
        split = []
        for f, descriptor in zip(np.flatnonzero(due).tolist(), descriptors):
            track = tracks[f]
            track.checked_at = self._step
            if not np.all(np.isfinite(descriptor)):
                track.doubt = None  # no view to decide on: the track goes on as it was
            elif track.signature is None:
                track.signature = descriptor.copy()
            elif not self._disagrees(track, track.signature, descriptor):
                track.doubt = None
                track.signature = track.signature + descriptor
            elif track.doubt is None:
                track.doubt = descriptor
            else:
                split.append(track.track_id)
                tracks[f] = self._split(track, track.doubt + descriptor)
        return tuple(split)

    def _disagrees(self, track: _Track, signature: np.ndarray, descriptor: np.ndarray) -> bool:
        """Whether `descriptor` is someone else's than the track's `signature`. A first
        disagreement is held to `identity_distance` after a miss or before confirmation,
        else to CONTINUOUS_MARGIN more; the view after it to the same limit."""
        if track.doubt is None:
            gap = track.reacquired or not track.confirmed
            track.doubt_limit = self.identity_threshold + (0.0 if gap else CONTINUOUS_MARGIN)
        distance = float(identity_distance(signature, descriptor[None])[0])
        log.debug(
            "track %d: face %.3f from its signature (limit %.2f)",
            track.track_id, distance, track.doubt_limit,
        )  # fmt: skip
        return distance > track.doubt_limit

    def _split(self, track: _Track, descriptor: np.ndarray) -> _Track:
        """A new track for the face that `track` matched, which is someone else's: it starts
        unconfirmed, with that face as its signature."""
        self._tracks.remove(track)
        successor = _Track(self._next_id, track.box.copy(), signature=descriptor.copy())
        successor.checked_at = self._step
        self._next_id += 1
        self._tracks.append(successor)
        return successor

    def _confirm(self, tracks: list[_Track]) -> None:
        """Ready tracks are confirmed once their identity is known or waited for long enough."""
        identity = self.identity_threshold > 0
        for track in tracks:
            if track.confirmed or track.ready_since is None:
                continue
            waited = self._step - track.ready_since >= self.identity_wait
            track.confirmed = not identity or track.signature is not None or waited

    def _signatures(self, tracks: list[_Track]) -> np.ndarray:
        if not tracks:
            return np.zeros((0, self._dimensions), np.float32)
        return np.stack([track.unit_signature(self._dimensions) for track in tracks])

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
                track.box, track.reacquired, track.missed = boxes[f], track.missed > 0, 0
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
        tracks_of_faces = []
        for f, face_track in enumerate(of_face):
            if face_track is None:
                face_track = _Track(self._next_id, boxes[f])
                self._next_id += 1
                survivors.append(face_track)
            tracks_of_faces.append(face_track)
        self._tracks = survivors
        return tracks_of_faces, tuple(ended)
