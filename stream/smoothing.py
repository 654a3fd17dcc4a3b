"""Per-track smoothing of age and gender, weighted by view quality, and the skip policy.

Each estimate counts in proportion to how good the view was (detection score, face
size, sharpness, frontalness) and how sure the estimator was. Age is a decayed
weighted mean with a standard error; gender is the weighted mean log-odds, shown as a
label only where the evidence is strong (GenderRule), otherwise as unsure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from stream.config import TrackingConfig
from stream.types import FEMALE, MALE, NO_GENDER, UNSURE, Estimates, Faces, Smoothed

# Faces this wide (px) or wider count as full size for quality.
FULL_QUALITY_FACE_PX = 96.0
# Laplacian variance of a 64 px grey face crop at which sharpness counts as half.
HALF_SHARPNESS_VARIANCE = 60.0
# Spread (years) of an estimator's age distribution at which its confidence counts half.
AGE_STD_HALF = 5.0
# p_male is clipped before the logit so one overconfident frame cannot decide a track.
P_CLIP = 0.02
# Gender evidence (summed view weights: two to five good views, each 0.2-0.6) after which a
# track that is still unsure is so for its own reasons, and is re-estimated only on the
# settled schedule.
SETTLED_GENDER_EVIDENCE = 1.0


def sharpness(image_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    """(n,) in [0, 1): Laplacian variance of each face box resized to 64 px grey."""
    height, width = image_bgr.shape[:2]
    values = np.zeros(len(xyxy), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.round(xyxy).astype(int)):
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if x2 - x1 < 4 or y2 - y1 < 4:
            continue
        grey = cv2.cvtColor(cv2.resize(image_bgr[y1:y2, x1:x2], (64, 64)), cv2.COLOR_BGR2GRAY)
        variance = float(cv2.Laplacian(grey, cv2.CV_32F).var())
        values[i] = variance / (variance + HALF_SHARPNESS_VARIANCE)
    return values


def frontalness(keypoints: np.ndarray) -> np.ndarray:
    """(n,) in [0, 1]: 1 when the nose projects midway between the eyes, 0 when it projects
    onto an eye or beyond (a profile view, where estimates are least reliable)."""
    right_eye, left_eye, nose = keypoints[:, 0], keypoints[:, 1], keypoints[:, 2]
    eye_axis = left_eye - right_eye
    along = np.einsum("ij,ij->i", nose - right_eye, eye_axis) / np.maximum(
        np.einsum("ij,ij->i", eye_axis, eye_axis), 1e-6
    )
    return np.clip(1.0 - np.abs(2.0 * along - 1.0), 0.0, 1.0).astype(np.float32)


def view_quality(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """(n,) in [0, 1]: product of detection score, size, sharpness and frontalness."""
    if len(faces) == 0:
        return np.zeros(0, np.float32)
    size = np.minimum(faces.xyxy[:, 2] - faces.xyxy[:, 0], faces.xyxy[:, 3] - faces.xyxy[:, 1])
    size_factor = np.clip(size / FULL_QUALITY_FACE_PX, 0.0, 1.0)
    return (
        faces.score * size_factor * sharpness(image_bgr, faces.xyxy) * frontalness(faces.keypoints)
    ).astype(np.float32)


def estimate_confidence(estimates: Estimates) -> np.ndarray:
    """(n,) in [0, 1]: how sure the estimator was of each face. From the spread of its age
    distribution when it gives one (1 / (1 + (std / AGE_STD_HALF)^2): a 5-year spread counts
    half), else its top age class's probability; 0.5 for a regressor that gives neither."""
    if estimates.age_std is not None:
        confidence = 1.0 / (1.0 + (estimates.age_std / AGE_STD_HALF) ** 2)
    else:
        confidence = estimates.age_confidence
    return np.where(np.isfinite(confidence), confidence, 0.5).astype(np.float32)


@dataclass(frozen=True)
class GenderRule:
    """When a track's gender is shown, from the `tracking` config (see config.yaml)."""

    margin: float
    keep_margin: float
    min_age: float
    min_evidence: float

    @classmethod
    def from_config(cls, settings: TrackingConfig) -> GenderRule:
        return cls(
            settings.gender_margin,
            settings.gender_keep_margin,
            settings.gender_min_age,
            settings.gender_min_evidence,
        )

    def label(self, p_male: float, age: float, evidence: float, shown: int) -> int:
        """The label state for a track's smoothed `p_male`, its `age`, the weight of its
        gender evidence and the label `shown` so far: MALE or FEMALE once p_male is at least
        `margin` from 0.5 and kept until it comes within `keep_margin` (no flicker at the
        edge); UNSURE for children (faces show gender weakly before puberty), for too little
        evidence, and in between. MALE therefore always has p_male > 0.5."""
        if math.isnan(p_male):
            return NO_GENDER
        if evidence < self.min_evidence or (math.isfinite(age) and age < self.min_age):
            return UNSURE
        call = MALE if p_male > 0.5 else FEMALE
        needed = self.keep_margin if shown == call else self.margin
        return call if abs(p_male - 0.5) >= needed else UNSURE


class TrackState:
    """Evidence accumulated for one track; merged into a returning person's new track."""

    def __init__(self, track_id: int, rule: GenderRule) -> None:
        self.track_id = track_id
        self.rule = rule
        self.best_quality = 0.0
        self.last_estimated_frame = -1
        # Decayed sums: age weights, their squares, weighted ages and their squares; gender
        # weights and the weighted log-odds of male.
        self.w = self.w2 = self.wx = self.wxx = 0.0
        self.w_gender = self.logit_evidence = 0.0
        # Weights of the views with an age range, and their weighted distances from their age
        # down to the range's low end and up to its high end.
        self.w_range = self.w_below = self.w_above = 0.0
        self.gender = UNSURE

    def add_estimate(
        self,
        age: float,
        p_male: float,
        weight: float,
        decay: float,
        age_range: tuple[float, float] = (math.nan, math.nan),
    ) -> None:
        """Fold in one estimate; NaN stands for what the estimator does not predict."""
        if math.isfinite(age):
            self.w = decay * self.w + weight
            self.w2 = decay**2 * self.w2 + weight**2
            self.wx = decay * self.wx + weight * age
            self.wxx = decay * self.wxx + weight * age * age
        low, high = age_range
        if math.isfinite(age) and math.isfinite(low) and math.isfinite(high):
            self.w_range = decay * self.w_range + weight
            self.w_below = decay * self.w_below + weight * (age - low)
            self.w_above = decay * self.w_above + weight * (high - age)
        if math.isfinite(p_male):
            p = min(max(p_male, P_CLIP), 1 - P_CLIP)
            self.w_gender = decay * self.w_gender + weight
            self.logit_evidence = decay * self.logit_evidence + weight * math.log(p / (1 - p))
        self._relabel()

    def merge(self, earlier: TrackState) -> None:
        """Take in the evidence of the same person's earlier track (re-identified)."""
        for name in (
            "w", "w2", "wx", "wxx", "w_gender", "logit_evidence", "w_range", "w_below", "w_above"
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(earlier, name))
        self.best_quality = max(self.best_quality, earlier.best_quality)
        self.gender = earlier.gender
        self._relabel()

    def _relabel(self) -> None:
        self.gender = self.rule.label(self.p_male, self.age, self.w_gender, self.gender)

    @property
    def has_estimate(self) -> bool:
        return self.w > 0 or self.w_gender > 0

    @property
    def gender_settled(self) -> bool:
        """A label shown, no gender model at all, or evidence enough that an unsure label is
        the face's own ambiguity: nothing more to wait for."""
        return self.gender != UNSURE or self.w_gender >= SETTLED_GENDER_EVIDENCE

    @property
    def age(self) -> float:
        return self.wx / self.w if self.w > 0 else math.nan

    @property
    def age_range(self) -> tuple[float, float]:
        """The track's 80 % age range: its views' ranges, as distances below and above their
        own ages averaged with the weights of the age, about the smoothed age. Views of one
        face share its errors, so more views do not narrow it (unlike `age_uncertainty`)."""
        if self.w_range <= 0 or self.w <= 0:
            return math.nan, math.nan
        age = self.age
        return max(age - self.w_below / self.w_range, 0.0), age + self.w_above / self.w_range

    @property
    def age_uncertainty(self) -> float:
        """Standard error of the weighted mean: spread of the estimates over sqrt(n_eff)."""
        if self.w <= 0:
            return math.inf
        n_eff = self.w * self.w / self.w2
        if n_eff < 1.5:
            return math.inf
        variance = max(self.wxx / self.w - self.age**2, 0.0) * n_eff / (n_eff - 1)
        return math.sqrt(variance / n_eff)

    @property
    def p_male(self) -> float:
        if self.w_gender <= 0:
            return math.nan
        return 1.0 / (1.0 + math.exp(-self.logit_evidence / self.w_gender))


class TrackSmoother:
    """All tracks' smoothing state plus the policy of which faces to estimate.

    Args:
        settings: the `tracking` config section.
        fps: source frame rate, to turn the half-life into a per-frame decay.
    """

    def __init__(self, settings: TrackingConfig, fps: float) -> None:
        self.settings = settings
        self._decay = 0.5 ** (1.0 / max(settings.half_life_s * fps, 1.0))
        self._rule = GenderRule.from_config(settings)
        self._states: dict[int, TrackState] = {}

    def observe(self, track_ids: np.ndarray) -> None:
        """Start the state of tracks seen for the first time."""
        for track_id in track_ids.tolist():
            if track_id not in self._states:
                self._states[track_id] = TrackState(track_id, self._rule)

    def needs_estimate(
        self, track_ids: np.ndarray, confirmed: np.ndarray, quality: np.ndarray, frame: int
    ) -> np.ndarray:
        """(n,) bool: nothing for tracks not yet confirmed (they are not shown, and most
        false detections never confirm); new and unsettled tracks every frame; settled ones
        every `reestimate_every` frames or when the view beats the best so far."""
        settings = self.settings
        wanted = np.zeros(len(track_ids), bool)
        for i, (track_id, q) in enumerate(zip(track_ids.tolist(), quality.tolist())):
            state = self._states.get(track_id)
            if not confirmed[i]:
                continue
            if state is None or not state.has_estimate:
                wanted[i] = True
                continue
            age_settled = state.w == 0 or state.age_uncertainty <= settings.settled_age_uncertainty
            settled = age_settled and state.gender_settled
            due = frame - state.last_estimated_frame >= settings.reestimate_every
            better_view = q > state.best_quality * settings.better_view_ratio
            wanted[i] = not settled or due or better_view
        return wanted

    def add_estimates(
        self,
        track_ids: np.ndarray,
        estimates: Estimates,
        quality: np.ndarray,
        frame: int,
    ) -> None:
        """Fold in estimates for the faces that were estimated this frame."""
        no_range = np.full(len(estimates), np.nan, np.float32)
        lows = no_range if estimates.age_low is None else estimates.age_low
        highs = no_range if estimates.age_high is None else estimates.age_high
        for track_id, age, p_male, confidence, q, low, high in zip(
            track_ids.tolist(),
            estimates.age.tolist(),
            estimates.p_male.tolist(),
            estimate_confidence(estimates).tolist(),
            quality.tolist(),
            lows.tolist(),
            highs.tolist(),
        ):
            state = self._states[track_id]
            # The estimator's own confidence scales the view quality; a floor keeps a
            # hard-to-call face from being ignored entirely.
            weight = max(q, 1e-3) * (0.5 + 0.5 * confidence)
            state.add_estimate(age, p_male, weight, self._decay, (low, high))
            state.last_estimated_frame = frame
            state.best_quality = max(state.best_quality, q)

    def smoothed(self, track_ids: np.ndarray) -> Smoothed:
        states = [self._states[track_id] for track_id in track_ids.tolist()]
        ranges = np.array([s.age_range for s in states], np.float32).reshape(-1, 2)
        return Smoothed(
            age=np.array([s.age for s in states], np.float32),
            age_uncertainty=np.array([s.age_uncertainty for s in states], np.float32),
            p_male=np.array([s.p_male for s in states], np.float32),
            gender=np.array([s.gender for s in states], np.int8),
            age_low=ranges[:, 0],
            age_high=ranges[:, 1],
        )

    def merge(self, track_id: int, earlier: TrackState) -> None:
        """Continue `earlier` (an ended track of the same person) in `track_id`."""
        self._states[track_id].merge(earlier)

    def end(self, track_ids: tuple[int, ...] | list[int]) -> dict[int, TrackState]:
        """Forget ended tracks; their states are returned (a returning person's track takes
        them over)."""
        return {t: self._states.pop(t) for t in track_ids if t in self._states}
