"""Frozen records passed between pipeline stages (a frame's faces as column arrays), from the
stages to the sinks (annotated frames, stream starts), and the records of served streams:
their status, people's visits and the counts kept of them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np


def check_shape(name: str, array: np.ndarray, expected: tuple[int | None, ...]) -> None:
    """Raise ValueError naming `name` when `array` does not have the `expected` shape.

    `None` in `expected` matches any length on that axis.
    """
    if array.ndim != len(expected) or any(
        want is not None and got != want for got, want in zip(array.shape, expected)
    ):
        shown = "(" + ", ".join("_" if want is None else str(want) for want in expected) + ")"
        raise ValueError(f"{name} must be an array of shape {shown}, but got shape {array.shape}")


@dataclass(frozen=True)
class SourceInfo:
    """What a source is, known once it is opened."""

    source_id: str
    width: int
    height: int
    fps: float
    is_file: bool
    frame_count: int | None = None


@dataclass(frozen=True)
class Frame:
    """One decoded BGR frame and where it came from.

    Attributes:
        image: (H, W, 3) uint8 BGR.
        index: its number in the source (a live source's dropped frames leave gaps).
        timestamp: time.monotonic() when it was captured.
        source_id: the source's name, credentials redacted.
        position_ms: its presentation time in a file (from the container, so variable
            frame rates are right), or None for live sources.
    """

    image: np.ndarray
    index: int
    timestamp: float
    source_id: str
    position_ms: float | None = None

    def __post_init__(self) -> None:
        check_shape("Frame.image", self.image, (None, None, 3))


@dataclass(frozen=True)
class Faces:
    """Detected faces of one frame, as column arrays.

    Attributes:
        xyxy: (n, 4) float32 boxes in pixels, x1, y1, x2, y2.
        score: (n,) float32 detector confidence.
        keypoints: (n, 6, 2) float32 pixel keypoints in MediaPipe order: right eye,
            left eye, nose tip, mouth centre, right ear tragion, left ear tragion
            (right and left of the person, not of the image).
    """

    xyxy: np.ndarray
    score: np.ndarray
    keypoints: np.ndarray

    def __post_init__(self) -> None:
        check_shape("Faces.xyxy", self.xyxy, (None, 4))
        n = len(self.xyxy)
        check_shape("Faces.score", self.score, (n,))
        check_shape("Faces.keypoints", self.keypoints, (n, 6, 2))

    def __len__(self) -> int:
        return len(self.xyxy)

    @classmethod
    def empty(cls) -> Faces:
        return cls(
            xyxy=np.zeros((0, 4), np.float32),
            score=np.zeros((0,), np.float32),
            keypoints=np.zeros((0, 6, 2), np.float32),
        )

    def __getitem__(self, index: np.ndarray | slice) -> Faces:
        return Faces(self.xyxy[index], self.score[index], self.keypoints[index])


@dataclass(frozen=True)
class Estimates:
    """Age and gender estimates for a batch of faces, as column arrays.

    A column an estimator does not predict is NaN (an age-only model's p_male, a
    regressor's age_confidence); optional columns are None when not produced.

    Attributes:
        age: (n,) float32 expected age in years.
        p_male: (n,) float32 probability that the face is male.
        age_confidence: (n,) float32 probability of the most likely age class.
        age_groups: (n, k) float32 age-group probabilities of a group classifier, or None.
        age_group_labels: the k group labels, in column order; set with `age_groups`.
        age_raw: (n,) float32 age before the estimator's bias correction, or None.
        age_std: (n,) float32 spread (standard deviation, years) of the estimator's own age
            distribution for each face, or None when it gives none.
        age_low, age_high: (n,) float32 calibrated 80 % range of each face's age (years), or
            None from an estimator without an age distribution.
    """

    age: np.ndarray
    p_male: np.ndarray
    age_confidence: np.ndarray
    age_groups: np.ndarray | None = None
    age_group_labels: tuple[str, ...] | None = None
    age_raw: np.ndarray | None = None
    age_std: np.ndarray | None = None
    age_low: np.ndarray | None = None
    age_high: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_shape("Estimates.age", self.age, (None,))
        n = len(self.age)
        check_shape("Estimates.p_male", self.p_male, (n,))
        check_shape("Estimates.age_confidence", self.age_confidence, (n,))
        if (self.age_groups is None) != (self.age_group_labels is None):
            raise ValueError("Estimates.age_groups and age_group_labels must be set together")
        if self.age_groups is not None:
            labels = self.age_group_labels or ()
            check_shape("Estimates.age_groups", self.age_groups, (n, len(labels)))
        if self.age_raw is not None:
            check_shape("Estimates.age_raw", self.age_raw, (n,))
        if (self.age_low is None) != (self.age_high is None):
            raise ValueError("Estimates.age_low and age_high must be set together")
        for name in ("age_std", "age_low", "age_high"):
            if getattr(self, name) is not None:
                check_shape(f"Estimates.{name}", getattr(self, name), (n,))

    def __len__(self) -> int:
        return len(self.age)


# Codes of Smoothed.gender: the one label state every output shows.
FEMALE, MALE, UNSURE, NO_GENDER = 0, 1, 2, 3
GENDER_NAMES = {FEMALE: "female", MALE: "male", UNSURE: "unsure", NO_GENDER: None}
# The genders a person is counted under, and their age groups with the ages that start the
# next one (the live page's charts, the people report).
SHOWN_GENDERS = ("male", "female", "unsure")
PERSON_AGE_GROUPS = ("0-9", "10-19", "20-39", "40-59", "60+")
PERSON_AGE_GROUP_EDGES = (10, 20, 40, 60)


def person_age_group(age: float) -> str:
    """The PERSON_AGE_GROUPS name of an age in years."""
    return PERSON_AGE_GROUPS[bisect.bisect_right(PERSON_AGE_GROUP_EDGES, age)]


@dataclass(frozen=True)
class Smoothed:
    """Per-track smoothed estimates for the faces of one frame, as column arrays.

    Attributes:
        age: (n,) years.
        age_uncertainty: (n,) standard error in years (inf until there are two estimates).
        age_low, age_high: (n,) the track's 80 % age range (NaN without one): its views'
            calibrated ranges, their distances below and above each view's age averaged
            with the age's own weights, about the smoothed age.
        p_male: (n,) from the weighted mean log-odds.
        gender: (n,) int8 label state: FEMALE, MALE, UNSURE (too little or too weak
            evidence to say) or NO_GENDER (the estimator predicts none). A MALE label always
            has p_male > 0.5 and a FEMALE one p_male < 0.5.
    """

    age: np.ndarray
    age_uncertainty: np.ndarray
    p_male: np.ndarray
    gender: np.ndarray
    age_low: np.ndarray | None = None
    age_high: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_shape("Smoothed.age", self.age, (None,))
        n = len(self.age)
        if self.age_low is None or self.age_high is None:
            nan = np.full(n, np.nan, np.float32)
            object.__setattr__(self, "age_low", nan)
            object.__setattr__(self, "age_high", nan.copy())
        for name in ("age_uncertainty", "p_male", "gender", "age_low", "age_high"):
            check_shape(f"Smoothed.{name}", getattr(self, name), (n,))


@dataclass(frozen=True)
class FrameResult:
    """Everything known about one processed frame.

    `estimates` are this frame's raw estimates, NaN for faces that were not
    estimated (see `estimated`); `smoothed` are the per-track values shown; `quality`
    is each face's view quality (stream.smoothing.view_quality). `track_ids` are the
    people's identities; `confirmed` is False for faces whose track is not yet confirmed
    (too few detections, or not yet a face to a second look): they get no label. `cut` is
    True when the frame starts a new shot (every earlier track ended before it). `outside`
    are the faces found outside the stream's region of interest: not tracked, labelled or
    counted, only blurred when faces are.
    """

    frame: Frame
    faces: Faces
    estimates: Estimates
    track_ids: np.ndarray | None = None
    smoothed: Smoothed | None = None
    estimated: np.ndarray | None = None
    quality: np.ndarray | None = None
    confirmed: np.ndarray | None = None
    t_ms: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    cut: bool = False
    outside: Faces | None = None

    def __post_init__(self) -> None:
        n = len(self.faces)
        if len(self.estimates) != n:
            raise ValueError(
                f"FrameResult needs one estimate per face: {n} faces, "
                f"but got {len(self.estimates)} estimates"
            )
        if self.track_ids is not None:
            check_shape("FrameResult.track_ids", self.track_ids, (n,))
        if self.smoothed is not None and len(self.smoothed.age) != n:
            raise ValueError(
                f"FrameResult needs one smoothed estimate per face: {n} faces, "
                f"but got {len(self.smoothed.age)}"
            )
        if self.estimated is not None:
            check_shape("FrameResult.estimated", self.estimated, (n,))
        if self.quality is not None:
            check_shape("FrameResult.quality", self.quality, (n,))
        if self.confirmed is not None:
            check_shape("FrameResult.confirmed", self.confirmed, (n,))


class StreamIdInUse(ValueError):
    """A served stream's `add` was given the id of a stream that is already there."""


@dataclass(frozen=True)
class TrackStatus:
    """One person in view of a served stream, as the live page and the API show them.

    Attributes:
        track: the person's id within the stream.
        age: smoothed age in years, or None before the first estimate.
        age_uncertainty: its standard error in years, or None while unknown.
        age_low, age_high: its 80 % range in years, or None without one.
        gender: "male", "female", "unsure", or None for an estimator without gender.
        confidence: the shown gender's probability (p_male or 1 - p_male), None when unsure.
        seconds_in_view: since the person was first confirmed (a person who left and came
            back within `tracking.reid_s` counts from their first appearance).
    """

    track: int
    age: float | None
    age_uncertainty: float | None
    gender: str | None
    confidence: float | None
    seconds_in_view: float
    age_low: float | None = None
    age_high: float | None = None


@dataclass(frozen=True)
class StreamStatus:
    """What a served stream is doing now (the JSON API's stream object).

    Attributes:
        id: the stream's id (unique in the server).
        source: where it reads from, credentials redacted.
        state: "starting", "running", "reconnecting", "ended" (a file without --loop) or
            "failed" (with `error`).
        fps: frames processed per second over the last few seconds.
        faces: faces in the latest frame.
        tracks: the people in view in the latest frame.
        dropped: frames a live source dropped so far (the newest frame wins).
        frames: frames processed so far.
        latency_ms_p95: capture to annotated frame, 95th percentile over the last frames.
        error: why the stream failed, or None.
        node: the cluster node serving it (`serve --cluster`), else None.
    """

    id: str
    source: str
    state: str
    fps: float
    faces: int
    tracks: tuple[TrackStatus, ...]
    dropped: int
    frames: int
    latency_ms_p95: float | None
    error: str | None = None
    node: str | None = None


@dataclass(frozen=True)
class AnnotatedFrame:
    """One processed frame on its way to the sinks.

    Attributes:
        result: what was found in it.
        image: the annotated (H, W, 3) uint8 BGR image (faces blurred when asked).
        left: the people (track ids) who left with this frame: gone for good, past the time
            they could come back as themselves (`tracking.reid_s`).
    """

    result: FrameResult
    image: np.ndarray
    left: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_shape("AnnotatedFrame.image", self.image, (None, None, 3))


@dataclass(frozen=True)
class StreamStart:
    """What a sink learns when its stream starts.

    Attributes:
        camera: the stream's name (a served stream's id; `run`'s source name).
        run: this incarnation of the stream, unique across restarts (its UTC start stamp and
            a number): person ids restart with each incarnation.
        info: the opened source.
        source: an absolute file path, or the URL with its credentials redacted.
        estimator: the estimator's name.
        wall_start: time.time() when the stream started.
        node: the cluster node it runs on (`serve --cluster`), else None.
        moved_from: the node it ran on before that node died, else None.
    """

    camera: str
    run: str
    info: SourceInfo
    source: str
    estimator: str
    wall_start: float
    node: str | None = None
    moved_from: str | None = None


# The age group and gender a person is counted under when the model gave none.
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Visit:
    """One person's visit to one camera, from when their track was confirmed to when they were
    last seen; kept in the visits store, sent as events.

    Attributes:
        camera: the stream's name.
        run: the stream incarnation (`StreamStart.run`): with `person`, the visit's key.
        person: the person's id (track id) within the incarnation.
        first_seen, last_seen: unix seconds.
        age, age_low, age_high: the smoothed age and its 80 % range in years, or None.
        gender: "male", "female", "unsure", or None for an estimator without gender.
        confidence: the shown gender's probability, or None when unsure or without gender.
        ended: True once the person left; False while still in view (an open visit is
            written every few seconds, so a crash loses at most those seconds).
    """

    camera: str
    run: str
    person: int
    first_seen: float
    last_seen: float
    age: float | None
    age_low: float | None
    age_high: float | None
    gender: str | None
    confidence: float | None
    ended: bool

    @property
    def age_group(self) -> str:
        """The PERSON_AGE_GROUPS name the visit is counted under, or UNKNOWN."""
        return UNKNOWN if self.age is None else person_age_group(self.age)

    @property
    def counted_gender(self) -> str:
        """The gender the visit is counted under: a SHOWN_GENDERS name or UNKNOWN."""
        return self.gender if self.gender in SHOWN_GENDERS else UNKNOWN


@dataclass(frozen=True)
class CountRow:
    """People who came into view of one camera in one period, of one age group and gender; a
    person counts once, in the period of their `first_seen`.

    Attributes:
        camera: the stream's name.
        start: unix seconds of the period's start (a UTC hour or day).
        period: "hour" or "day".
        age_group: a PERSON_AGE_GROUPS name or UNKNOWN.
        gender: a SHOWN_GENDERS name or UNKNOWN.
        people: how many.
    """

    camera: str
    start: float
    period: str
    age_group: str
    gender: str
    people: int
