"""The training recipe of agestream's own GenderAge model, read from a YAML file and checked
key by key (types and ranges), with the data it names, before anything runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from stream.config import ConfigError

DEFAULT_TRAIN_CONFIG = Path(__file__).with_name("genderage.yaml")


class _Section(BaseModel):
    # Strict as the main config: "64" in quotes is text, .inf and .nan no one's setting.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, values: Any) -> Any:
        """YAML's lists are the tuples here (strict mode takes no list for a tuple)."""
        if not isinstance(values, dict):
            return values
        return {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}


def _ordered(pair: tuple) -> tuple:
    if pair[0] > pair[1]:
        raise ValueError("a [low, high] range needs low <= high")
    return pair


# A folder path, written as text in YAML.
Folder = Annotated[Path, Field(strict=False)]
# [low, high] ranges of the augmentations, each end within its bounds.
Ordered = AfterValidator(_ordered)
Side = Annotated[int, Field(ge=2, le=512)]
Quality = Annotated[int, Field(ge=1, le=100)]
Smear = Annotated[int, Field(ge=1, le=64)]
Gain = Annotated[float, Field(gt=0, le=1.0)]


class DataSettings(_Section):
    train: Folder
    dev: tuple[Folder, ...] = ()
    train_limit: int | None = Field(default=None, ge=1)
    dev_limit: int | None = Field(default=None, ge=1)
    cache: Folder = Path("runs/chips")
    workers: int = Field(default=2, ge=1, le=64)


class ModelSettings(_Section):
    size: int = Field(default=112, ge=32, le=512)
    margin: float = Field(default=1.25, gt=0.5, le=3.0)
    border: int = Field(default=8, ge=0, le=64)
    age_bins: int = Field(default=101, ge=2, le=200)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    backbone: Literal["mobilenet-v2", "efficientnet-lite0"] = "mobilenet-v2"
    # ImageNet weights of that backbone (see `agestream models`), or null for random ones.
    pretrained: bool = True

    @property
    def pretrained_weights(self) -> str | None:
        """The `agestream models` name of the backbone's ImageNet weights, if they are used."""
        return f"{self.backbone}-imagenet" if self.pretrained else None


class OptimSettings(_Section):
    epochs: int = Field(default=16, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=2, le=4096)
    backbone_lr: float = Field(default=6e-4, gt=0, le=1.0)
    head_lr: float = Field(default=3e-3, gt=0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0, le=1.0)
    warmup_epochs: float = Field(default=0.5, ge=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1.0)


class LossSettings(_Section):
    age_sigma_min: float = Field(default=1.0, gt=0)
    age_sigma_per_year: float = Field(default=0.06, ge=0)
    age_sigma_max: float = Field(default=4.0, gt=0)
    age_l1: float = Field(default=0.1, ge=0)
    gender: float = Field(default=1.0, ge=0)
    gender_smoothing: float = Field(default=0.1, ge=0, lt=1.0)

    @model_validator(mode="after")
    def _sigma_range(self) -> LossSettings:
        if self.age_sigma_min > self.age_sigma_max:
            raise ValueError(
                f"age_sigma_min {self.age_sigma_min} is above age_sigma_max {self.age_sigma_max}"
            )
        return self


class AugmentSettings(_Section):
    flip: bool = True
    scale: float = Field(default=0.08, ge=0, lt=0.5)
    rotate_deg: float = Field(default=10.0, ge=0, le=45)
    shift_px: float = Field(default=4.0, ge=0)
    brightness: float = Field(default=0.25, ge=0, lt=1.0)
    contrast: float = Field(default=0.25, ge=0, lt=1.0)
    saturation: float = Field(default=0.3, ge=0, le=1.0)
    grey: float = Field(default=0.05, ge=0, le=1.0)
    low_res: float = Field(default=0.25, ge=0, le=1.0)
    low_res_px: Annotated[tuple[Side, Side], Ordered] = (24, 80)
    jpeg: float = Field(default=0.3, ge=0, le=1.0)
    jpeg_quality: Annotated[tuple[Quality, Quality], Ordered] = (30, 90)
    motion_blur: float = Field(default=0.0, ge=0, le=1.0)
    motion_blur_px: Annotated[tuple[Smear, Smear], Ordered] = (3, 9)
    low_light: float = Field(default=0.0, ge=0, le=1.0)
    low_light_gain: Annotated[tuple[Gain, Gain], Ordered] = (0.3, 0.7)
    low_light_noise: float = Field(default=0.03, ge=0, le=0.5)


class BalanceSettings(_Section):
    bin_years: int = Field(default=5, ge=1)
    power: float = Field(default=0.5, ge=0, le=1.0)


class ExportSettings(_Section):
    flip_average: bool = False


class TrainConfig(_Section):
    data: DataSettings
    model: ModelSettings = ModelSettings()
    optim: OptimSettings = OptimSettings()
    loss: LossSettings = LossSettings()
    augment: AugmentSettings = AugmentSettings()
    balance: BalanceSettings = BalanceSettings()
    export: ExportSettings = ExportSettings()
    seed: int = Field(default=0, ge=0, lt=2**63)  # NumPy and PyTorch take 0 to 2**63 - 1
    threads: int = Field(default=0, ge=0, le=256)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def digest(self) -> str:
        """A short hash of everything that shapes the trained weights (not where files go)."""
        recipe = self.model_dump(
            mode="json", exclude={"data": {"cache", "workers"}, "export": True}
        )
        return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def load_train_config(path: Path | None = None) -> TrainConfig:
    """Read and check a training config; paths in it are relative to the current folder."""
    path = path or DEFAULT_TRAIN_CONFIG
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read it as YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(values).__name__}")
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {key}: {message} (got {first.get('input')!r})") from None


def check_data(config: TrainConfig, path: Path | None = None) -> None:
    """The recipe's data before any chip is cut: every folder there, and at least one batch
    of labelled training images (`path` names the recipe in errors).

    Raises:
        ConfigError: the key, the folder and what to do.
        ValueError: a labels.csv row that is wrong (FILE:LINE).
    """
    from stream.faceset import load_labelled

    where = path or DEFAULT_TRAIN_CONFIG
    data = config.data
    for key, folder in [("data.train", data.train), *(("data.dev", d) for d in data.dev)]:
        if not folder.is_dir():
            raise ConfigError(
                f"{where}: {key}: folder {folder} not found (paths are relative to the folder "
                "you run from)"
            )
    images = len(load_labelled(data.train, data.train_limit))
    if config.optim.batch_size > images:
        raise ConfigError(
            f"{where}: optim.batch_size: {config.optim.batch_size} is more than the {images} "
            f"training images of {data.train}; lower it or add images"
        )
