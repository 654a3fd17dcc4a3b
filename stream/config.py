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
    """Which estimator(s) run, and their models.

    `name` predicts whatever it can; `age` / `gender` name a different estimator for
    that one output (e.g. an age-only classifier beside onnx-genderage for gender).
    `model` is the path or hub id for `name`; `options` maps an estimator name to
    its own options (a `model` key among them). Names and option keys are checked
    when the estimator is created.
    """

    name: str = "onnx-genderage"
    age: str | None = None
    gender: str | None = None
    model: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0

    def __post_init__(self) -> None:
        for key in ("name", "age", "gender", "model"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"estimator.{key} must be a non-empty string, but got {value!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(
                f"estimator.options must be a mapping, but got {type(self.options).__name__}"
            )
        for estimator, options in self.options.items():
            if not isinstance(options, dict):
                raise ConfigError(
                    f"estimator.options.{estimator} must be a mapping of option: value, "
                    f"but got {type(options).__name__}"
                )
        if not self.providers:
            raise ConfigError("estimator.providers must name at least one ONNX Runtime provider")
        if self.threads < 0:
            raise ConfigError(f"estimator.threads must be >= 0, but got {self.threads}")


@dataclass(frozen=True)
class SourceConfig:
    queue_size: int = 8
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    rtsp_transport: str = "tcp"

    def __post_init__(self) -> None:
        if self.rtsp_transport not in ("tcp", "udp"):
            raise ConfigError(
                f"source.rtsp_transport: invalid value {self.rtsp_transport!r}, "
                "expecting one of tcp, udp"
            )
        if self.queue_size < 1:
            raise ConfigError(f"source.queue_size must be >= 1, but got {self.queue_size}")
        for name in ("open_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"source.{name} must be > 0, but got {getattr(self, name)}")


@dataclass(frozen=True)
class TrackingConfig:
    lifetime_s: float = 1.0
    iou_threshold: float = 0.3
    min_hits: int = 3
    half_life_s: float = 10.0
    gender_flip_log_odds: float = 4.0
    settled_age_uncertainty: float = 2.0
    reestimate_every: int = 15
    better_view_ratio: float = 1.25

    def __post_init__(self) -> None:
        positive = ("half_life_s", "gender_flip_log_odds", "settled_age_uncertainty")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"tracking.{name} must be > 0, but got {getattr(self, name)}")
        if self.lifetime_s < 0:
            raise ConfigError(f"tracking.lifetime_s must be >= 0, but got {self.lifetime_s}")
        if not 0 < self.iou_threshold < 1:
            raise ConfigError(
                f"tracking.iou_threshold must be in (0, 1), but got {self.iou_threshold}"
            )
        for name in ("min_hits", "reestimate_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tracking.{name} must be >= 1, but got {getattr(self, name)}")
        if self.better_view_ratio < 1:
            raise ConfigError(
                f"tracking.better_view_ratio must be >= 1, but got {self.better_view_ratio}"
            )


@dataclass(frozen=True)
class OutputConfig:
    window: bool = True
    video: str | None = None
    json: str | None = None
    tracks: str | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"output.max_frames must be >= 1, but got {self.max_frames}")


@dataclass(frozen=True)
class Config:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
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
