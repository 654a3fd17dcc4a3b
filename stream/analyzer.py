"""Detect → align → estimate on one image: the per-frame work shared by `run` and `evaluate`."""

from __future__ import annotations

import time

import cv2
import numpy as np

from detectors import Detector
from estimators import Estimator
from stream.align import extract_chips
from stream.types import Estimates, Faces


class FaceAnalyzer:
    """Runs the detector, aligns every face once per chip size, estimates all faces in one batch."""

    def __init__(self, detector: Detector, estimator: Estimator) -> None:
        self.detector = detector
        self.estimator = estimator

    def analyze(self, image_bgr: np.ndarray) -> tuple[Faces, Estimates, dict[str, float]]:
        """Returns the faces, their estimates and per-stage timings in milliseconds."""
        started = time.perf_counter()
        image_rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        faces = self.detector.detect(image_rgb)
        detected = time.perf_counter()
        chips = {
            size: extract_chips(image_rgb, faces.keypoints, size)
            for size in self.estimator.chip_sizes
        }
        aligned = time.perf_counter()
        estimates = self.estimator.estimate(chips)
        estimated = time.perf_counter()
        timings = {
            "detect": (detected - started) * 1000,
            "align": (aligned - detected) * 1000,
            "estimate": (estimated - aligned) * 1000,
        }
        return faces, estimates, timings
