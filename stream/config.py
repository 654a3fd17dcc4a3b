"""YAML configuration → frozen, validated dataclasses: every key's type and range is checked
when the file is loaded, and unknown keys are rejected, never ignored."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from stream.web_guard import HOST_PATTERN

# Inside the package, so an installed wheel has the same defaults; the top-level config.yaml
# is a link to it.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "config.yaml"

# Strict: YAML's "no" or "8" in quotes are text, not a bool or a number; NaN and infinity
# are no one's intended setting.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
# Beyond this many ONNX Runtime threads a session spends its time switching, not working.
MAX_THREADS = 128

Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, lt=1)]


def package_version() -> str:
    """agestream's installed version ("unknown" when run from a tree that was not installed)."""
    try:
        return importlib.metadata.version("agestream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says where and how."""


@dataclass(frozen=True, config=STRICT)
class DetectorConfig:
    model: Literal["short", "full", "auto"] = "auto"
    min_confidence: Probability = 0.5
    min_face_px: Annotated[int, Field(ge=0)] = 20
    auto_full_range_width: Annotated[int, Field(ge=1)] = 640


@dataclass(frozen=True, config=STRICT)
class EstimatorConfig:
    """Which estimator(s) run, and their models.

    `name` predicts whatever it can; `age` / `gender` name a different estimator for
    that one output (e.g. an age-only classifier beside genderage for gender).
    `model` is the path or hub id for `name`; `options` maps an estimator name to
    its own options (a `model` key among them). Names and option keys are checked
    when the estimator is created.
    """

    name: Annotated[str, Field(min_length=1)] = "genderage"
    age: Annotated[str, Field(min_length=1)] | None = None
    gender: Annotated[str, Field(min_length=1)] | None = None
    model: Annotated[str, Field(min_length=1)] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    providers: Annotated[tuple[str, ...], Field(min_length=1)] = ("CPUExecutionProvider",)
    threads: Annotated[int, Field(ge=0, le=MAX_THREADS)] = 0


@dataclass(frozen=True, config=STRICT)
class SourceConfig:
    queue_size: Annotated[int, Field(ge=1, le=1024)] = 8
    open_timeout_s: Positive = 5.0
    read_timeout_s: Positive = 5.0
    rtsp_transport: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True, config=STRICT)
class TrackingConfig:
    lifetime_s: Annotated[float, Field(ge=0)] = 1.0
    iou_threshold: Probability = 0.3
    min_hits: Annotated[int, Field(ge=1)] = 3
    half_life_s: Positive = 10.0
    face_check_score: Annotated[float, Field(ge=0, lt=1)] = 0.65
    cut_threshold: Annotated[float, Field(ge=0, lt=1)] = 0.08
    identity_distance: Annotated[float, Field(ge=0, lt=2)] = 0.4
    identity_check_s: Positive = 1.0
    identity_wait_s: Annotated[float, Field(ge=0)] = 0.25
    reid_s: Annotated[float, Field(ge=0)] = 30.0
    reid_distance: Annotated[float, Field(ge=0, lt=2)] = 0.3
    reid_similarity: Probability = 0.9
    gender_margin: Annotated[float, Field(gt=0, lt=0.5)] = 0.3
    gender_keep_margin: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    gender_min_age: Annotated[float, Field(ge=0)] = 10.0
    gender_min_evidence: Annotated[float, Field(ge=0)] = 0.1
    settled_age_uncertainty: Positive = 2.0
    reestimate_every: Annotated[int, Field(ge=1)] = 15
    better_view_ratio: Annotated[float, Field(ge=1)] = 1.25

    def __post_init__(self) -> None:
        # A shown label kept beyond the margin that shows it would flip every frame.
        if self.gender_keep_margin > self.gender_margin:
            raise ValueError(
                f"gender_keep_margin ({self.gender_keep_margin}) must not exceed gender_margin "
                f"({self.gender_margin})"
            )


@dataclass(frozen=True, config=STRICT)
class OutputConfig:
    window: bool = True
    pace: bool = True
    video: Annotated[str, Field(min_length=1)] | None = None
    json: Annotated[str, Field(min_length=1)] | None = None
    tracks: Annotated[str, Field(min_length=1)] | None = None
    max_frames: Annotated[int, Field(ge=1)] | None = None
    hud: bool = True
    blur: bool = False


# The sections a served stream may set for itself (`serve.streams[].settings`).
STREAM_SECTIONS = ("detector", "source", "tracking", "output")
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


# Label syntax, Ray's (Kubernetes'): a node's labels (`agestream cluster join --labels
# zone=hall`) are checked against it, and a stream's (`labels`) too, so that they can meet.
LABEL_PART = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"({LABEL_PART}(\.{LABEL_PART})*/)?{LABEL_PART}"
LabelKey = Annotated[str, Field(pattern=rf"^{LABEL_KEY}$")]
LabelValue = Annotated[str, Field(pattern=rf"^{LABEL_PART}$")]  # a stream's: not empty


@dataclass(frozen=True, config=STRICT)
class StreamEntry:
    """One stream `agestream serve` starts with: a source argument, an optional id, the
    region of the frame whose faces count (`roi`: left, top, right, bottom as fractions of its
    width and height; a face counts when its box's centre is inside), and settings of its own
    (`{section: {key: value}}` over the config's detector, source, tracking and output). With
    `serve.cluster`, it runs on a node whose labels include all of `labels`."""

    source: Annotated[str, Field(min_length=1)] | Annotated[int, Field(ge=0)]
    id: Annotated[str, Field(min_length=1)] | None = None
    roi: tuple[Fraction, Fraction, Fraction, Fraction] | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[LabelKey, LabelValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.roi is not None and not (self.roi[0] < self.roi[2] and self.roi[1] < self.roi[3]):
            raise ValueError(
                f"roi is [left, top, right, bottom] with left < right and top < bottom, "
                f"got {list(self.roi)}"
            )
        for section in self.settings:
            if section not in STREAM_SECTIONS:
                raise ValueError(f"settings may set {', '.join(STREAM_SECTIONS)}, not {section!r}")


@dataclass(frozen=True, config=STRICT)
class ServeConfig:
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    allowed_hosts: tuple[Annotated[str, Field(pattern=HOST_PATTERN)], ...] = ()
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 5.0
    loop: bool = False
    output_dir: Annotated[str, Field(min_length=1)] | None = None
    store: Literal["counts", "video"] = "counts"
    database: Annotated[str, Field(min_length=1)] | None = None
    streams: tuple[StreamEntry, ...] = ()
    # A Ray cluster's head (HOST:PORT) to spread the streams over its worker nodes.
    cluster: Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$")] | None = None
    estimator_service: bool = False  # with cluster: estimate through one Ray Serve deployment
    estimator_service_gpus: Annotated[float, Field(ge=0, le=64)] = 0.0  # each replica's GPUs


@dataclass(frozen=True, config=STRICT)
class EventsConfig:
    mqtt: Annotated[str, Field(min_length=1)] | None = None
    mqtt_prefix: Annotated[str, Field(min_length=1, pattern=r"^[^#+]+$")] = "agestream"
    home_assistant: bool = False
    webhooks: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1000


@dataclass(frozen=True, config=STRICT)
class Config:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    models_dir: Annotated[str, Field(min_length=1)] | None = None


def _hint(kind: str, value: Any) -> str:
    if kind in ("float_type", "int_type") and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        if "e" in value.lower() and "." not in value:
            # YAML 1.1 reads 1e-9 as text: an exponent needs a dot in the mantissa.
            return f"; YAML read it as text: write {value.lower().replace('e', '.0e', 1)}"
        return f"; YAML read it as text: write {value} without quotes"
    if kind == "tuple_type":
        return "; write a list, e.g. [CPUExecutionProvider]"
    if kind == "bool_type":
        return "; write true or false"
    if kind == "string_pattern_mismatch":  # serve.allowed_hosts is the one key with a pattern
        return "; write a host name or address with an optional :port, e.g. box.local:8080"
    return ""


def _describe(error: ValidationError, where: str) -> ConfigError:
    """One line naming the key, what it must be and what it got."""
    first = error.errors()[0]
    key = ".".join([where, *map(str, first["loc"])] if where else map(str, first["loc"]))
    if first["type"] == "value_error":  # a check across keys: its message says it all
        return ConfigError(f"{key or 'config'}: {first['ctx']['error']}")
    value = first.get("input")
    shown = repr(value) if not (isinstance(value, float) and not math.isfinite(value)) else value
    return ConfigError(
        f"{key or 'config'}: {first['msg']}, but got {shown}{_hint(first['type'], value)}"
    )


# Keys whose value is a list of mappings, each built as this dataclass.
_LISTS_OF: dict[str, type] = {"streams": StreamEntry}


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
        factory = fields[key].default_factory
        default = factory() if callable(factory) else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, path)
        elif key in _LISTS_OF and isinstance(value, list):
            item = _LISTS_OF[key]
            kwargs[key] = tuple(_build(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValidationError as error:
        raise _describe(error, where) from None


def _read_mapping(config_path: Path) -> Any:
    try:
        text = config_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{config_path} is not a text file (not UTF-8); a config file is YAML text"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {config_path}: {error.strerror}") from None
    if "\0" in text:
        raise ConfigError(f"{config_path} is not a text file (it has NUL bytes); use YAML text")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_path} is not valid YAML: {error}".splitlines()[0]) from None


def load_config(path: str | Path | None = None) -> Config:
    """Read and check a YAML config; `None` reads the packaged defaults."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not config_path.is_file():
        if path is None:
            return Config()
        raise ConfigError(f"config file not found: {config_path}")
    values = _read_mapping(config_path)
    try:
        config = _build(Config, values, "")
        for i, entry in enumerate(config.serve.streams):
            stream_config(config, entry, f"serve.streams[{i}].settings")
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    return config


def stream_config(config: Config, entry: StreamEntry, where: str = "settings") -> Config:
    """`config` with a served stream's own settings applied.

    Raises:
        ConfigError: an unknown key or a bad value, named as `where`.SECTION.KEY.
    """
    for section, changes in entry.settings.items():
        try:
            config = override(config, section, **changes)
        except TypeError as error:  # an unknown key
            raise ConfigError(f"{where}.{section}: {error}") from None
        except ConfigError as error:
            raise ConfigError(f"{where}.{error}") from None
    return config


def apply_file(config: Config, path: str | Path) -> Config:
    """`config` with the settings of a YAML file of sections applied over it (only the keys
    the file names change), e.g. `tracking: {identity_distance: 0}`."""
    values = _read_mapping(Path(path)) if Path(path).is_file() else None
    if values is None:
        raise ConfigError(f"config file not found: {path}")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    for section, changes in values.items():
        if not isinstance(changes, dict) or not hasattr(config, section):
            raise ConfigError(f"{path}: {section!r} is not a config section with settings")
        config = override(config, section, **changes)
    return config


def override(config: Config, section: str | None, **changes: Any) -> Config:
    """Return `config` with the non-None `changes` applied (CLI flags win over the file)."""
    changes = {key: value for key, value in changes.items() if value is not None}
    if not changes:
        return config
    try:
        if section is None:
            return dataclasses.replace(config, **changes)
        updated = dataclasses.replace(getattr(config, section), **changes)
    except ValidationError as error:
        raise _describe(error, section or "") from None
    return dataclasses.replace(config, **{section: updated})
