"""The training recipe of agestream's own GenderAge model, read from a YAML file and checked
key by key (types and ranges) before anything runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream.config import ConfigError

DEFAULT_TRAIN_CONFIG = Path(__file__).with_name("genderage.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Section):
    train: Path
    dev: tuple[Path, ...] = ()
    train_limit: int | None = Field(default=None, ge=1)
    dev_limit: int | None = Field(default=None, ge=1)
    cache: Path = Path("runs/chips")
    workers: int = Field(default=2, ge=1, le=64)


class ModelSettings(_Section):
    size: int = Field(default=112, ge=32, le=512)
    margin: float = Field(default=1.25, gt=0.5, le=3.0)
    border: int = Field(default=8, ge=0, le=64)
    age_bins: int = Field(default=101, ge=2, le=200)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    pretrained: Literal["mobilenet-v2-imagenet"] | None = "mobilenet-v2-imagenet"


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
    low_res_px: tuple[int, int] = (24, 80)
    jpeg: float = Field(default=0.3, ge=0, le=1.0)
    jpeg_quality: tuple[int, int] = (30, 90)


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
    seed: int = 0
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
        raise ConfigError(f"{path}: {key}: {first['msg']} (got {first.get('input')!r})") from None
