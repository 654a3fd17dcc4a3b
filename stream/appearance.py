"""People's identities across tracks: a track confirmed soon after another ended continues the
same person when its face matches (face signatures from the tracker); the colours of hair, face
and clothes around it only help a face that is almost close enough."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from stream.cuts import HISTOGRAM_BINS, patch_histogram
from stream.tracking import identity_distance

# Regions around a face box (x1, y1, x2, y2 in box widths/heights from its top left): the
# head with the hair above the face, the face, and the upper body below it. Clothes and hair
# tell people apart over seconds to minutes, which is what re-identification here is for.
REGIONS = ((-0.2, -0.5, 1.2, 0.25), (0.1, 0.1, 0.9, 0.9), (-0.6, 1.3, 1.6, 2.6))
# A region is sampled to about this many pixels a side: a colour histogram needs no detail,
# and a sample costs far less than converting a whole 720p region.
PATCH_SIDE = 64
# Every this many frames a confirmed track's look is sampled.
SAMPLE_EVERY = 5
# A face this much further than `reid_distance` still matches when the colours around it match
# too (people dressed alike are told apart by their faces; colour only settles near misses).
COLOUR_SLACK = 0.03

# What an ended track had learnt (the smoother's state); identities only carry it along.
Evidence = TypeVar("Evidence")


def appearance(image_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    """(n, d) float32 unit vectors: per region, its colour histogram (stream.cuts), so that the
    dot product of two is their Bhattacharyya coefficient averaged over the regions (1: the
    same colours). A region outside the frame is zeros."""
    height, width = image_bgr.shape[:2]
    size = HISTOGRAM_BINS
    features = np.zeros((len(xyxy), len(REGIONS) * size), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(xyxy, np.float64)):
        box_w, box_h = x2 - x1, y2 - y1
        for r, (left, top, right, bottom) in enumerate(REGIONS):
            cols = slice(max(int(x1 + left * box_w), 0), min(int(x1 + right * box_w), width))
            rows = slice(max(int(y1 + top * box_h), 0), min(int(y1 + bottom * box_h), height))
            patch = image_bgr[rows, cols]
            if patch.shape[0] < 2 or patch.shape[1] < 2:
                continue
            features[i, r * size : (r + 1) * size] = patch_histogram(patch, PATCH_SIDE)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-9)


@dataclass(eq=False)
class _Person(Generic[Evidence]):
    person_id: int
    look: np.ndarray | None = None
    looks: int = 0
    # Unit face signature of the person's latest track; None while no usable view was seen.
    face: np.ndarray | None = None
    # What the person's last track had learnt, once it ended.
    evidence: Evidence | None = None

    def add_look(self, look: np.ndarray) -> None:
        self.looks += 1
        self.look = look if self.look is None else self.look + (look - self.look) / self.looks


@dataclass(frozen=True)
class IdentityUpdate(Generic[Evidence]):
    """One frame's identities.

    Attributes:
        person_ids: (n,) int64 person per face, 0 where the face's track is not confirmed.
        returned: (track id, evidence) for each track found this frame to continue a person
            who had left: the evidence their earlier track left (see `Identities.end`).
    """

    person_ids: np.ndarray
    returned: tuple[tuple[int, Evidence], ...]


class Identities(Generic[Evidence]):
    """Gives each confirmed track a person id: a new one, or that of a person who left at most
    `reid_s` ago and whose face matches (within `reid_distance`, or within COLOUR_SLACK more of
    it when their look also matches with at least `similarity`). A track without a usable
    view of its face is a new person: clothes alone never make two people one.

    Args:
        reid_s: how long (media seconds) a person who left can come back as the same person.
        reid_distance: largest face-signature distance (see `tracking.identity_distance`) to
            call a new track a returning person.
        similarity: least appearance similarity (0..1) that lets a face just beyond
            `reid_distance` match.
    """

    def __init__(self, reid_s: float, reid_distance: float, similarity: float) -> None:
        self.reid_s = reid_s
        self.reid_distance = reid_distance
        self.similarity = similarity
        self._person_of_track: dict[int, _Person[Evidence]] = {}
        # People whose track ended, with when it did (seconds of media time); oldest first.
        self._away: dict[_Person[Evidence], float] = {}
        self._next_id = 1
        self._updates = 0  # frames seen: a live stream's frame numbers skip its drops

    def update(
        self,
        image_bgr: np.ndarray,
        xyxy: np.ndarray,
        track_ids: np.ndarray,
        confirmed: np.ndarray,
        signatures: np.ndarray,
    ) -> IdentityUpdate[Evidence]:
        """Person ids of the frame's faces, given their tracks and (n, d) track signatures
        (NaN rows: none yet)."""
        ids = track_ids.tolist()
        confirmed_faces = np.flatnonzero(confirmed).tolist()
        new_faces = [i for i in confirmed_faces if ids[i] not in self._person_of_track]
        self._updates += 1
        sampled = confirmed_faces if self._updates % SAMPLE_EVERY == 0 else new_faces
        look_of = dict(zip(sampled, appearance(image_bgr, xyxy[sampled])))
        returned: list[tuple[int, Evidence]] = []
        for i in new_faces:
            person = self._returning(look_of[i], signatures[i]) if self.reid_s > 0 else None
            if person is None:
                person = _Person(self._next_id)
                self._next_id += 1
            elif person.evidence is not None:
                returned.append((ids[i], person.evidence))
            person.evidence = None
            self._person_of_track[ids[i]] = person
        person_ids = np.zeros(len(ids), np.int64)
        for i in confirmed_faces:
            person = self._person_of_track[ids[i]]
            if i in look_of:
                person.add_look(look_of[i])
            if np.all(np.isfinite(signatures[i])):
                person.face = signatures[i]
            person_ids[i] = person.person_id
        return IdentityUpdate(person_ids, tuple(returned))

    def _returning(self, look: np.ndarray, face: np.ndarray) -> _Person[Evidence] | None:
        """The away person whose face is nearest `face`, if near enough; no longer away."""
        known = [(p, p.face) for p in self._away if p.face is not None]
        if not known or not np.all(np.isfinite(face)):
            return None
        distances = identity_distance(face, np.stack([known_face for _, known_face in known]))
        nearest = int(np.argmin(distances))
        person, distance = known[nearest][0], float(distances[nearest])
        colour = float(look @ person.look) if person.look is not None else 0.0
        if distance > self.reid_distance and not (
            distance <= self.reid_distance + COLOUR_SLACK and colour >= self.similarity
        ):
            return None
        del self._away[person]
        return person

    def end(self, ended: dict[int, Evidence], now_s: float) -> list[int]:
        """Tracks that ended, with the evidence each had learnt; returns the people who have
        now been away longer than `reid_s` (their rows can be written)."""
        for track_id, evidence in ended.items():
            person = self._person_of_track.pop(track_id, None)
            if person is not None:
                person.evidence = evidence
                self._away[person] = now_s
        gone = [p for p, left_s in self._away.items() if now_s - left_s >= self.reid_s]
        self._away = {p: left_s for p, left_s in self._away.items() if now_s - left_s < self.reid_s}
        return [p.person_id for p in gone]
