"""The estimator contract: face crops in, column-array estimates out.

Every estimator declares what it predicts and the crops it needs (`CropSpec`);
the analyzer cuts each distinct crop once per frame and passes
`{spec: (n, size, size, 3) uint8 RGB}`. All faces of a frame arrive in one call
so models run batched. Colour order and normalization are the estimator's own
(`InputSpec.prepare`), so estimators with different recipes still share crops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from stream.config import ConfigError
from stream.types import Estimates

AGE = "age"
GENDER = "gender"


class ModelLoadError(RuntimeError):
    """A model file is missing or unusable; the message names it and what to do."""


@dataclass(frozen=True)
class CropSpec:
    """How to cut a face out of the frame.

    Attributes:
        size: side of the square crop in pixels.
        align: "chip" for the dlib-framed aligned chip of stream/align.py (from the
            keypoints, dlib's pixels replayed), "warp" for the same framing by one fast
            affine warp (widened by `margin`), "box" for an upright square centred on the
            detector box.
        margin: for "box", the crop side as a multiple of the box's longer side; for
            "warp", how many times wider than dlib's framing; unused by "chip".
    """

    size: int
    align: Literal["chip", "warp", "box"] = "chip"
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.align not in ("chip", "warp", "box"):
            raise ValueError(
                f"CropSpec.align must be 'chip', 'warp' or 'box', but got {self.align!r}"
            )
        if self.size < 2:
            raise ValueError(f"CropSpec.size must be >= 2, but got {self.size}")
        if self.margin <= 0:
            raise ValueError(f"CropSpec.margin must be > 0, but got {self.margin}")


@dataclass(frozen=True)
class InputSpec:
    """A model's input recipe: which crop, then colour order, scaling, normalization, layout.

    `prepare` computes `((crop / scale) - mean) / std` in the declared channel order.
    """

    crop: CropSpec
    channels: Literal["RGB", "BGR"] = "RGB"
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 RGB crops -> contiguous float32 model input."""
        expected = (None, self.crop.size, self.crop.size, 3)
        if crops.ndim != 4 or crops.shape[1:] != expected[1:]:
            raise ValueError(
                f"crops must have shape (n, {self.crop.size}, {self.crop.size}, 3), "
                f"but got {crops.shape}"
            )
        batch = crops[..., ::-1] if self.channels == "BGR" else crops
        batch = batch.astype(np.float32) / np.float32(self.scale)
        batch = (batch - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch, dtype=np.float32)


@dataclass(frozen=True)
class EstimatorSettings:
    """What one estimator is built from: its model, options and runtime settings.

    Attributes:
        name: registry name.
        model: path or hub id of the weights; None for the estimator's default.
        options: estimator-specific options from the config (`estimator.options.NAME`).
        providers: ONNX Runtime providers in order of preference.
        threads: threads per session (0: the runtime decides).
    """

    name: str
    model: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0

    def take(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The options with `defaults` filled in; an unknown option is a ConfigError."""
        unknown = sorted(set(self.options) - set(defaults))
        if unknown:
            valid = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(
                f"unknown option {unknown[0]!r} for estimator {self.name!r}; valid options: {valid}"
            )
        return {**defaults, **self.options}


class Estimator(Protocol):
    """Estimates age and/or gender for a batch of face crops.

    Attributes:
        name: registry name.
        predicts: the subset of ("age", "gender") it predicts; the rest is NaN.
        crops: the crops `estimate` needs, one entry per distinct spec.
    """

    name: str
    predicts: tuple[str, ...]
    crops: tuple[CropSpec, ...]

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates: ...


def first_line(error: BaseException) -> str:
    """An exception's first message line, or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_error(error: BaseException) -> BaseException:
    """The exception a remote call raised where it ran, out of the wrapper that brought it
    back (Ray's RayTaskError keeps it as `cause`), else `error` itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def load_failure(what: str, model: str | Path, error: BaseException) -> ModelLoadError:
    """One-line ModelLoadError for a model file or hub id that could not be loaded."""
    return ModelLoadError(
        f"cannot load {what} model {model}: {first_line(error)}; "
        "check the path (or hub id) in estimator.model / estimator.options"
    )


def required_model_file(name: str, model: str | None, kinds: str, framework: str) -> Path:
    """The existing file `estimator.model` names, for estimators without default weights."""
    if model is None:
        raise ModelLoadError(
            f"{name} has no default weights; set estimator.model to your {kinds} file"
        )
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"{framework} model file not found: {path}; check estimator.model")
    return path


def nan_column(n: int) -> np.ndarray:
    return np.full((n,), np.nan, np.float32)


def regression_estimates(age: np.ndarray, age_raw: np.ndarray | None = None) -> Estimates:
    """Estimates of an age-only regressor: no gender, no class confidence."""
    age = np.asarray(age, np.float32).reshape(-1)
    return Estimates(
        age=age, p_male=nan_column(len(age)), age_confidence=nan_column(len(age)), age_raw=age_raw
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
