"""Detect → align → estimate on one image: the per-frame work shared by `run` and `evaluate`."""

from __future__ import annotations

import time
from dataclasses import replace

import cv2
import numpy as np

from detectors import Detector
from estimators import CropSpec, Estimator
from stream.align import extract_chips, warp_chips
from stream.config import DetectorConfig
from stream.face_id import FaceEmbedder
from stream.smoothing import frontalness
from stream.types import Estimates, Faces, check_shape


def box_crops(image_rgb: np.ndarray, xyxy: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Upright square crops centred on each box, side = margin x the box's longer side.

    Args:
        image_rgb: (H, W, 3) uint8 frame.
        xyxy: (n, 4) boxes in pixels.
        size: output side in pixels.
        margin: crop side as a multiple of the box's longer side.

    Returns:
        (n, size, size, 3) uint8; area outside the frame is black (as InsightFace pads).
    """
    check_shape("xyxy", xyxy, (None, 4))
    rows, cols = image_rgb.shape[:2]
    crops = np.zeros((len(xyxy), size, size, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(xyxy, np.float64)):
        side = max(1, round(max(x2 - x1, y2 - y1) * margin))
        left = round((x1 + x2 - side) / 2)
        top = round((y1 + y2 - side) / 2)
        square = np.zeros((side, side, 3), np.uint8)
        # The part of the square inside the frame; the rest stays black.
        in_left, in_top = max(left, 0), max(top, 0)
        in_right, in_bottom = min(left + side, cols), min(top + side, rows)
        if in_left < in_right and in_top < in_bottom:
            square[in_top - top : in_bottom - top, in_left - left : in_right - left] = image_rgb[
                in_top:in_bottom, in_left:in_right
            ]
        # Area averaging when shrinking avoids aliasing on large faces.
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        crops[i] = cv2.resize(square, (size, size), interpolation=interpolation)
    return crops


def cut_crops(image_rgb: np.ndarray, faces: Faces, spec: CropSpec) -> np.ndarray:
    """The (n, size, size, 3) uint8 RGB crops `spec` asks for, one per face."""
    if spec.align == "chip":
        return extract_chips(image_rgb, faces.keypoints, spec.size)
    if spec.align == "warp":
        return warp_chips(image_rgb, faces.keypoints, spec.size, spec.margin)
    return box_crops(image_rgb, faces.xyxy, spec.size, spec.margin)


# The second look at a new track's face: BlazeFace short-range on a square crop of this side
# around the box, the face filling 1/FACE_CHECK_MARGIN of it (as in its training crops).
FACE_CHECK_SIZE = 128
FACE_CHECK_MARGIN = 1.8


def detector_config_for_checks(config: DetectorConfig) -> DetectorConfig:
    """The face checker's settings: short range (the crop is one close face), every score kept
    (the caller compares it with its own bar), no size floor (the crop is small)."""
    return replace(config, model="short", min_confidence=0.1, min_face_px=1)


# A view of a face good enough for its identity descriptor: this wide (px) at least, and
# no further from frontal than a three-quarter view (stream.smoothing.frontalness).
IDENTITY_MIN_FACE_PX = 36
IDENTITY_MIN_FRONTALNESS = 0.35


class FaceAnalyzer:
    """Runs the detector, cuts every face once per crop spec, estimates all faces in one batch.

    `detect` and `estimate` are separate so that the pipeline can estimate only the
    faces whose tracks still need it. `checker`, a second detector, gives a second opinion
    on faces (`face_likeness`); without one every face counts as a face. `embedder` gives
    faces an identity descriptor (`face_identity`).
    """

    def __init__(
        self,
        detector: Detector,
        estimator: Estimator,
        checker: Detector | None = None,
        embedder: FaceEmbedder | None = None,
    ) -> None:
        self.detector = detector
        self.estimator = estimator
        self.checker = checker
        self.embedder = embedder

    def face_identity(self, image_rgb: np.ndarray, faces: Faces) -> np.ndarray:
        """(n, d) unit identity descriptors, NaN rows for views too small or too far from
        frontal to tell people apart (and for every face without an embedder: d = 1)."""
        if self.embedder is None:
            return np.full((len(faces), 1), np.nan, np.float32)
        width = np.minimum(faces.xyxy[:, 2] - faces.xyxy[:, 0], faces.xyxy[:, 3] - faces.xyxy[:, 1])
        usable = (width >= IDENTITY_MIN_FACE_PX) & (
            frontalness(faces.keypoints) >= IDENTITY_MIN_FRONTALNESS
        )
        descriptors = np.full((len(faces), self.embedder.dimensions), np.nan, np.float32)
        if usable.any():
            descriptors[usable] = self.embedder.embed(image_rgb, faces[usable])
        return descriptors

    def face_likeness(self, image_rgb: np.ndarray, faces: Faces) -> np.ndarray:
        """(n,) float32: the checker's score for a face at the centre of a crop around each
        face (0: it sees none there); 1 for every face without a checker."""
        if self.checker is None:
            return np.ones(len(faces), np.float32)
        crops = box_crops(image_rgb, faces.xyxy, FACE_CHECK_SIZE, FACE_CHECK_MARGIN)
        scores = np.zeros(len(faces), np.float32)
        middle = FACE_CHECK_SIZE / 2
        for i, crop in enumerate(crops):
            found = self.checker.detect(crop)
            centres = (found.xyxy[:, :2] + found.xyxy[:, 2:]) / 2
            central = np.all(np.abs(centres - middle) < FACE_CHECK_SIZE / 4, axis=1)
            scores[i] = found.score[central].max(initial=0.0)
        return scores

    def detect(self, image_bgr: np.ndarray, timings: dict[str, float]) -> tuple[np.ndarray, Faces]:
        """The frame as RGB (what detector and estimators take) and its faces."""
        started = time.perf_counter()
        image_rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        faces = self.detector.detect(image_rgb)
        timings["detect"] = (time.perf_counter() - started) * 1000
        return image_rgb, faces

    def estimate(self, image_rgb: np.ndarray, faces: Faces, timings: dict[str, float]) -> Estimates:
        """Estimates for `faces`, in one batched call per model."""
        started = time.perf_counter()
        crops = {spec: cut_crops(image_rgb, faces, spec) for spec in self.estimator.crops}
        aligned = time.perf_counter()
        estimates = self.estimator.estimate(crops)
        timings["align"] = (aligned - started) * 1000
        timings["estimate"] = (time.perf_counter() - aligned) * 1000
        return estimates

    def analyze(self, image_bgr: np.ndarray) -> tuple[Faces, Estimates, dict[str, float]]:
        """Returns the faces, their estimates and per-stage timings in milliseconds."""
        timings: dict[str, float] = {}
        image_rgb, faces = self.detect(image_bgr, timings)
        return faces, self.estimate(image_rgb, faces, timings), timings
