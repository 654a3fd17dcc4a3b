"""Face detectors, imported only when chosen."""

from __future__ import annotations

import importlib
from pathlib import Path

from stream.config import DetectorConfig

from .base import Detector

DETECTORS = {"mediapipe": "detectors.mediapipe:MediaPipeDetector"}


def create_detector(
    config: DetectorConfig,
    frame_width: int,
    models_dir: str | Path | None = None,
    name: str = "mediapipe",
) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"Invalid detector {name!r}, expecting one of {', '.join(DETECTORS)}")
    module_name, class_name = DETECTORS[name].split(":")
    detector_class = getattr(importlib.import_module(module_name), class_name)
    return detector_class(config, frame_width, models_dir)


__all__ = ["DETECTORS", "Detector", "create_detector"]
