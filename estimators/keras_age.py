"""A Keras ResNet50 age regressor (seed 002): 256x256 RGB in [0, 1] -> age in years."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np

from stream.types import Estimates

from .base import (
    AGE,
    CropSpec,
    EstimatorSettings,
    InputSpec,
    ModelLoadError,
    load_failure,
    regression_estimates,
    required_model_file,
)

INPUT_SIZE = 256


def correct_age(age: np.ndarray) -> np.ndarray:
    """The seed's bias correction for its regressor's overestimates of older faces.

    50 <= a <= 65: 0.6 a - 10; a > 65: 0.7 a - 5; then clamped to [1, 100].
    """
    age = np.asarray(age, np.float32)
    corrected = np.where(age > 65, 0.7 * age - 5, np.where(age >= 50, 0.6 * age - 10, age))
    return np.clip(corrected, 1.0, 100.0).astype(np.float32)


class KerasResNet50:
    """Age from a Keras `.keras` / `.h5` regressor with one output.

    Options:
        bias_correction: report the seed's corrected age as `age` (the raw output is
            always in `age_raw`).
        margin: box crop side as a multiple of the face box's longer side.
    """

    name = "keras-resnet50"
    predicts: tuple[str, ...] = (AGE,)

    def __init__(self, settings: EstimatorSettings, models_dir: str | Path | None = None) -> None:
        options = settings.take({"bias_correction": True, "margin": 1.4})
        path = required_model_file(self.name, settings.model, ".keras or .h5", "Keras")
        try:
            self._model = keras.models.load_model(path, compile=False)
        except Exception as error:  # Keras raises many types for a file it cannot read
            raise load_failure(self.name, path, error) from error
        inputs, outputs = self._model.input_shape, self._model.output_shape
        if tuple(inputs[1:]) != (INPUT_SIZE, INPUT_SIZE, 3) or tuple(outputs[1:]) not in ((1,), ()):
            raise ModelLoadError(
                f"{path}: keras-resnet50 expects input (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) and "
                f"output (N, 1), but the model has input {inputs} and output {outputs}"
            )
        self._bias_correction = bool(options["bias_correction"])
        self._input = InputSpec(
            CropSpec(INPUT_SIZE, "box", float(options["margin"])), layout="NHWC"
        )
        self.crops = (self._input.crop,)

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        batch = crops[self._input.crop]
        if len(batch) == 0:
            return regression_estimates(np.zeros((0,), np.float32), np.zeros((0,), np.float32))
        # predict_on_batch runs a compiled graph: far faster than an eager call on CPU.
        output = self._model.predict_on_batch(self._input.prepare(batch))
        raw = np.asarray(output, np.float32).reshape(-1)
        age = correct_age(raw) if self._bias_correction else raw
        return regression_estimates(age, raw)
