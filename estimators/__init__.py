"""Age/gender estimators, each imported only when chosen by name."""

from __future__ import annotations

import importlib
from pathlib import Path

from stream.config import ConfigError, EstimatorConfig

from .base import Estimator

ESTIMATORS = {"onnx-genderage": "estimators.onnx_genderage:OnnxGenderAge"}


def create_estimator(config: EstimatorConfig, models_dir: str | Path | None = None) -> Estimator:
    if config.name not in ESTIMATORS:
        raise ConfigError(
            f"Invalid estimator {config.name!r}, expecting one of {', '.join(sorted(ESTIMATORS))}"
        )
    module_name, class_name = ESTIMATORS[config.name].split(":")
    estimator_class = getattr(importlib.import_module(module_name), class_name)
    return estimator_class(config, models_dir)


__all__ = ["ESTIMATORS", "Estimator", "create_estimator"]
