"""The estimator contract: aligned face chips in, column-array estimates out."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from stream.types import Estimates


class Estimator(Protocol):
    """Estimates age and gender for a batch of aligned RGB chips.

    `chip_sizes` names the square chip sizes the estimator needs; the pipeline
    aligns every face once per size and passes `{size: (n, size, size, 3) uint8}`.
    All faces of a frame arrive in one call so the models run batched.
    """

    name: str
    chip_sizes: tuple[int, ...]

    def estimate(self, chips: dict[int, np.ndarray]) -> Estimates: ...
