"""YAML configuration → frozen dataclasses; unknown keys are rejected, never ignored."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says where and how."""


@dataclass(frozen=True)
class DetectorConfig:
    model: str = "auto"
    min_confidence: float = 0.5
    min_face_px: int = 20
    auto_full_range_width: int = 640

    def __post_init__(self) -> None:
        if self.model not in ("short", "full", "auto"):
            raise ConfigError(
                f"detector.model: invalid value {self.model!r}, expecting one of short, full, auto"
            )
        if not 0.0 < self.min_confidence < 1.0:
            raise ConfigError(
                f"detector.min_confidence must be in (0, 1), but got {self.min_confidence}"
            )
        if self.min_face_px < 0:
            raise ConfigError(f"detector.min_face_px must be >= 0, but got {self.min_face_px}")


@dataclass(frozen=True)
class EstimatorConfig:
    name: str = "onnx-genderage"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.providers:
            raise ConfigError("estimator.providers must name at least one ONNX Runtime provider")
        if self.threads < 0:
            raise ConfigError(f"estimator.threads must be >= 0, but got {self.threads}")


@dataclass(frozen=True)
class SourceConfig:
    queue_size: int = 8
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ConfigError(f"source.queue_size must be >= 1, but got {self.queue_size}")
        for name in ("open_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"source.{name} must be > 0, but got {getattr(self, name)}")


@dataclass(frozen=True)
class OutputConfig:
    window: bool = True
    video: str | None = None
    json: str | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"output.max_frames must be >= 1, but got {self.max_frames}")


@dataclass(frozen=True)
class Config:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    models_dir: str | None = None


def _build(cls: type, values: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, but got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown config key {path!r}; valid keys here: {', '.join(sorted(fields))}"
            )
        default = fields[key].default_factory() if callable(fields[key].default_factory) else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, path)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{where or 'config'}: {error}") from error


def load_config(path: str | Path | None = None) -> Config:
    """Read a YAML config; `None` reads the packaged defaults."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not config_path.is_file():
        if path is None:
            return Config()
        raise ConfigError(f"config file not found: {config_path}")
    try:
        values = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_path} is not valid YAML: {error}".splitlines()[0]) from error
    try:
        return _build(Config, values, "")
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from error


def override(config: Config, section: str | None, **changes: Any) -> Config:
    """Return `config` with the non-None `changes` applied (CLI flags win over the file)."""
    changes = {key: value for key, value in changes.items() if value is not None}
    if not changes:
        return config
    if section is None:
        return dataclasses.replace(config, **changes)
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **changes)}
    )
