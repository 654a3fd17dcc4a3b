"""Face identity descriptors for tracking: dlib's face-recognition ResNet (stream.dlib_resnet),
run by ONNX Runtime on 150 px chips cut from the detector's keypoints, and their distance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from estimators.onnx_genderage import create_session
from stream.align import warp_chips
from stream.models import ensure_model
from stream.types import Faces, check_shape

MODEL_NAME = "face-id-dlib"
CHIP_SIZE = 150
DIMENSIONS = 128
# dlib cuts recognition chips with get_face_chip's padding 0.25; warp_chips' margin 1.0 is
# its padding 0.2, and a chip spans 1 + 2 * padding face widths.
CHIP_MARGIN = 1.5 / 1.4


class FaceEmbedder:
    """Unit-length 128-D identity descriptors of detected faces, all faces in one ONNX call.

    Compare them by Euclidean distance (`face_distance`). dlib's "same person below 0.6" is
    for its own descriptors, which are 1.3 to 1.65 long (median 1.45, measured); on these unit
    ones that split is near 0.4 (0.6 / 1.45), not 0.6.

    Args:
        model_path: the converted model (stream.models "face-id-dlib").
        threads: ONNX Runtime intra-op threads (0: the runtime decides).
    """

    dimensions = DIMENSIONS

    def __init__(self, model_path: Path | str, threads: int = 1) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: ONNX Runtime decides), but got {threads}")
        self._session = create_session(Path(model_path), threads=threads)
        self._input = self._session.get_inputs()[0].name

    def embed(self, image_rgb: np.ndarray, faces: Faces) -> np.ndarray:
        """(n, 128) float32 unit descriptors of `faces` in the (H, W, 3) uint8 RGB frame."""
        chips = warp_chips(image_rgb, faces.keypoints, CHIP_SIZE, CHIP_MARGIN)
        return self.embed_chips(chips)

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """(n, 128) float32 unit descriptors of (n, 150, 150, 3) uint8 RGB chips framed as
        dlib's get_face_chip(size=150, padding=0.25) frames them."""
        chips = np.asarray(chips)
        check_shape("chips", chips, (None, CHIP_SIZE, CHIP_SIZE, 3))
        if chips.dtype != np.uint8:
            raise ValueError(f"chips must be uint8, but got {chips.dtype}")
        if len(chips) == 0:
            return np.zeros((0, DIMENSIONS), np.float32)
        raw = self._session.run(None, {self._input: np.ascontiguousarray(chips)})[0]
        return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)

    def close(self) -> None:
        # ONNX Runtime frees a session with its last reference.
        self._session = None

    def __enter__(self) -> FaceEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def face_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) Euclidean distances between (n, d) and (m, d) descriptors; for the unit
    descriptors of `FaceEmbedder`, 0 is the same face and 2 the opposite direction."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    check_shape("a", a, (None, None))
    check_shape("b", b, (None, a.shape[1]))
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def create_face_embedder(models_dir: Path | str | None = None, threads: int = 1) -> FaceEmbedder:
    """A FaceEmbedder on the verified cached model, fetched and converted on first use."""
    return FaceEmbedder(ensure_model(MODEL_NAME, models_dir), threads=threads)
