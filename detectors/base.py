"""The face detector contract."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from stream.types import Faces


class Detector(Protocol):
    """Finds faces in one RGB image; a context manager that releases its model on exit."""

    def detect(self, image_rgb: np.ndarray) -> Faces: ...

    def close(self) -> None: ...

    def __enter__(self) -> Detector: ...

    def __exit__(self, *exc: object) -> None: ...
