"""MediaPipe BlazeFace through the Tasks API (`FaceDetector`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from stream.config import DetectorConfig
from stream.models import ensure_model
from stream.types import Faces

# MediaPipe's C++ side logs a warning per inference for the sparse full-range model;
# keep the user's terminal for our own messages.
os.environ.setdefault("GLOG_minloglevel", "2")

# mediapipe.tasks imports TensorFlow, when it is installed (the [tensorflow] extra), only
# for documentation decorators: seconds of start-up and hundreds of MB for nothing. Hide
# it during that import; code that needs TensorFlow later still imports it normally.
_tensorflow_hidden = "tensorflow" not in sys.modules
if _tensorflow_hidden:
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
try:
    import mediapipe as mp  # noqa: E402
    from mediapipe.tasks.python import BaseOptions, vision  # noqa: E402
finally:
    if _tensorflow_hidden:
        del sys.modules["tensorflow"]

log = logging.getLogger(__name__)

MODEL_NAMES = {"short": "blazeface-short", "full": "blazeface-full"}


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """MediaPipe's native loader writes warnings straight to fd 2, past Python logging.

    Used only while the model loads and unloads, before and after the pipeline's threads
    run; failures still surface as Python exceptions.
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def resolve_model(model: str, frame_width: int, auto_full_range_width: int) -> str:
    """Pick `short` or `full`; `auto` goes full-range for wide frames where faces are small."""
    if model != "auto":
        return model
    return "full" if frame_width > auto_full_range_width else "short"


class MediaPipeDetector:
    """BlazeFace in IMAGE mode: each frame stands alone, so dropped live frames are harmless."""

    def __init__(
        self, config: DetectorConfig, frame_width: int, models_dir: str | Path | None = None
    ) -> None:
        self.variant = resolve_model(config.model, frame_width, config.auto_full_range_width)
        self._min_face_px = config.min_face_px
        path = ensure_model(MODEL_NAMES[self.variant], models_dir)
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=config.min_confidence,
        )
        with _native_stderr_silenced():
            self._detector = vision.FaceDetector.create_from_options(options)
        log.info("detector: BlazeFace %s-range (%s)", self.variant, path.name)

    def detect(self, image_rgb: np.ndarray) -> Faces:
        height, width = image_rgb.shape[:2]
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image_rgb))
        detections = self._detector.detect(image).detections
        if not detections:
            return Faces.empty()
        xyxy = np.array(
            [
                [b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height]
                for b in (d.bounding_box for d in detections)
            ],
            dtype=np.float32,
        )
        score = np.array([d.categories[0].score for d in detections], dtype=np.float32)
        keypoints = np.array(
            [[(k.x * width, k.y * height) for k in d.keypoints] for d in detections],
            dtype=np.float32,
        )
        faces = Faces(xyxy=xyxy, score=score, keypoints=keypoints)
        sizes = np.minimum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1])
        return faces[sizes >= self._min_face_px]

    def close(self) -> None:
        with _native_stderr_silenced():
            self._detector.close()

    def __enter__(self) -> MediaPipeDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
