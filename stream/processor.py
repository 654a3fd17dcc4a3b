"""One frame's work with memory: detect → find shot cuts → track (confirmed by a second look,
one face identity per track) → identify the person → estimate the faces that need it → smooth."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from stream.analyzer import FaceAnalyzer
from stream.appearance import Identities
from stream.config import TrackingConfig
from stream.cuts import CutDetector, face_looks, scene_signature
from stream.smoothing import TrackSmoother, TrackState, view_quality
from stream.tracking import Tracker
from stream.types import Estimates, Faces, Frame, FrameResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detected:
    """A frame after detection: its RGB image, faces, scene signature and face looks
    (stream.cuts), or the error that stopped it; `outside`: the faces found outside the
    stream's region of interest, left out of everything but blurring."""

    frame: Frame
    image_rgb: np.ndarray | None
    faces: Faces | None
    timings: dict[str, float]
    error: Exception | None = None
    scene: np.ndarray | None = None
    looks: np.ndarray | None = None
    outside: Faces | None = None

    def found(self) -> tuple[np.ndarray, Faces]:
        """The RGB image and its faces; raises the error that stopped the detection."""
        if self.error is not None:
            raise self.error
        assert self.image_rgb is not None and self.faces is not None, "set when no error"
        return self.image_rgb, self.faces


def _scatter(estimates: Estimates, mask: np.ndarray) -> Estimates:
    """Full-length estimates with NaN where `mask` is False."""

    def scattered(values: np.ndarray) -> np.ndarray:
        column = np.full(len(mask), np.nan, np.float32)
        column[mask] = values
        return column

    def optional(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else scattered(values)

    return Estimates(
        scattered(estimates.age),
        scattered(estimates.p_male),
        scattered(estimates.age_confidence),
        age_std=optional(estimates.age_std),
        age_low=optional(estimates.age_low),
        age_high=optional(estimates.age_high),
    )


def in_region(
    faces: Faces, region: tuple[float, float, float, float], shape: tuple[int, ...]
) -> np.ndarray:
    """Which faces have their box's centre inside `region` (fractions of the frame)."""
    height, width = shape[:2]
    centre_x = (faces.xyxy[:, 0] + faces.xyxy[:, 2]) / 2 / width
    centre_y = (faces.xyxy[:, 1] + faces.xyxy[:, 3]) / 2 / height
    left, top, right, bottom = region
    return (centre_x >= left) & (centre_x < right) & (centre_y >= top) & (centre_y < bottom)


class FrameProcessor:
    """Owns the tracker, the identities and the smoothing state of one source; not
    thread-safe by design: one processing thread calls it, so it needs no locks."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        tracking: TrackingConfig,
        fps: float,
        region: tuple[float, float, float, float] | None = None,
    ) -> None:
        self.analyzer = analyzer
        # Only faces whose box centre is in this part of the frame (fractions of its width and
        # height) are tracked, labelled and counted; None: the whole frame.
        self.region = region
        identity = tracking.identity_distance if analyzer.embedder is not None else 0.0
        self.tracker = Tracker(
            fps, tracking.lifetime_s, tracking.iou_threshold, tracking.min_hits,
            tracking.face_check_score, identity,
            max(1, round(tracking.identity_check_s * fps)), round(tracking.identity_wait_s * fps),
        )  # fmt: skip
        self.cuts = CutDetector(tracking.cut_threshold)
        self.identities: Identities[TrackState] = Identities(
            tracking.reid_s, tracking.reid_distance, tracking.reid_similarity
        )
        self.smoother = TrackSmoother(tracking, fps)
        self.faces_estimated = 0

    def detect(self, frame: Frame) -> Detected:
        """The stateless first half of `process`; safe to run on another thread, one frame
        ahead of the stateful second half. A failure is kept for `process_detected`."""
        timings: dict[str, float] = {}
        try:
            image_rgb, faces = self.analyzer.detect(frame.image, timings)
            outside = None
            if self.region is not None:
                inside = in_region(faces, self.region, frame.image.shape)
                faces, outside = faces[inside], faces[~inside]
            at = time.perf_counter()
            scene = scene_signature(frame.image) if self.cuts.threshold > 0 else None
            looks = face_looks(frame.image, faces.xyxy) if self.tracker.identity_threshold else None
            timings["scene"] = (time.perf_counter() - at) * 1000
            return Detected(
                frame, image_rgb, faces, timings, scene=scene, looks=looks, outside=outside
            )
        except Exception as error:
            return Detected(frame, None, None, timings, error)

    def process_detected(self, detected: Detected, t_ms: float) -> tuple[FrameResult, list[int]]:
        """Track, identify, estimate the faces that need it, smooth; also the people whose
        records are complete with this frame (gone for longer than re-identification waits).
        Raises the detection's error."""
        image_rgb, faces = detected.found()
        frame, timings = detected.frame, dict(detected.timings)
        started = time.perf_counter()

        def identify(due: Faces) -> np.ndarray:
            at = time.perf_counter()
            descriptors = self.analyzer.face_identity(image_rgb, due)
            timings["identity"] = (time.perf_counter() - at) * 1000
            return descriptors

        timings["identity"] = 0.0
        update = self.tracker.update(
            faces,
            lambda pending: self.analyzer.face_likeness(image_rgb, pending),
            identify,
            cut=detected.scene is not None and self.cuts.update(detected.scene),
            looks=detected.looks,
        )
        gone = self.identities.end(self.smoother.end(update.ended), t_ms / 1000.0)
        self.smoother.observe(update.track_ids)
        people = self.identities.update(
            frame.image, faces.xyxy, update.track_ids, update.confirmed, update.signatures
        )
        for track_id, earlier in people.returned:
            self.smoother.merge(track_id, earlier)
        quality = view_quality(frame.image, faces)
        wanted = self.smoother.needs_estimate(
            update.track_ids, update.confirmed, quality, frame.index
        )
        timings["track"] = (time.perf_counter() - started) * 1000
        estimates, wanted = self._estimate(frame.index, image_rgb, faces, wanted, timings)
        self.smoother.add_estimates(
            update.track_ids[wanted], estimates, quality[wanted], frame.index
        )
        self.faces_estimated += int(wanted.sum())
        result = FrameResult(
            frame=frame,
            faces=faces,
            estimates=_scatter(estimates, wanted),
            track_ids=people.person_ids,
            smoothed=self.smoother.smoothed(update.track_ids),
            estimated=wanted,
            quality=quality,
            confirmed=update.confirmed,
            t_ms=t_ms,
            timings_ms=timings,
            cut=update.cut,
            outside=detected.outside,
        )
        return result, gone

    def _estimate(
        self,
        frame_index: int,
        image_rgb: np.ndarray,
        faces: Faces,
        wanted: np.ndarray,
        timings: dict[str, float],
    ) -> tuple[Estimates, np.ndarray]:
        """Estimates of the `wanted` faces, and which faces they are. When the estimator fails
        (a model error, a shared batcher's timeout) the frame gets none, logged, and keeps its
        faces, tracks and the labels so far: one bad call never blanks a frame."""
        try:
            return self.analyzer.estimate(image_rgb, faces[wanted], timings), wanted
        except Exception as error:
            log.warning("frame %d: estimates skipped: %s", frame_index, error)
            empty = np.zeros((0,), np.float32)
            return Estimates(empty, empty, empty), np.zeros(len(wanted), bool)

    def process(self, frame: Frame, t_ms: float) -> tuple[FrameResult, list[int]]:
        """The frame's result and the people whose records are complete with it."""
        return self.process_detected(self.detect(frame), t_ms)

    def skipped(self, frame: Frame, t_ms: float, error: Exception) -> FrameResult:
        """A frame whose analysis failed: logged, kept without faces so files stay whole."""
        log.warning("frame %d: analysis skipped: %s", frame.index, error)
        empty = np.zeros((0,), np.float32)
        return FrameResult(frame, Faces.empty(), Estimates(empty, empty, empty), t_ms=t_ms)
