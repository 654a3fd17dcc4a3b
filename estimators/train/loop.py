"""`agestream train`: the training loop with per-epoch validation, logs, resumable checkpoints
and ONNX export of the best epoch."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from estimators.base import CropSpec
from estimators.train.augment import age_targets, augment, centre_crop
from estimators.train.chips import ChipSet, load_chips, storage_spec
from estimators.train.config import TrainConfig
from estimators.train.model import GenderAgeNet, check_onnx, export_onnx
from stream.config import DetectorConfig
from stream.faceset import TRAIN_SPLITS, split_of
from stream.models import ensure_model, sha256_of

log = logging.getLogger(__name__)

AGE_BANDS = ((0, 10), (10, 20), (20, 60), (60, 200))
LAST, BEST, ONNX_NAME = "last.pt", "best.pt", "genderage.onnx"
# Weights inherit the terms of the faces they were trained on.
LICENCE = (
    "trained on UTKFace (non-commercial research use only) and All-Age-Faces "
    "(cite Cheng et al., 2019)"
)


class ReservedDataError(ValueError):
    """Training data includes images of the development or reserved evaluation split."""


@dataclass
class State:
    """Everything a resumed run needs to carry on as if it had not stopped."""

    net: GenderAgeNet
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    best_score: float = float("inf")


def model_crop(config: TrainConfig) -> CropSpec:
    """The crop the trained model takes: the pipeline cuts exactly this at run time."""
    return CropSpec(config.model.size, "warp", config.model.margin)


def check_training_split(chips: ChipSet) -> None:
    """Refuse images of the development (0) or reserved (1) split: train on 2-4 only."""
    wrong = [name for name in chips.names.tolist() if split_of(name) not in TRAIN_SPLITS]
    if wrong:
        raise ReservedDataError(
            f"{len(wrong)} training images are in the development or reserved split "
            f"(sha1(name) % 5 in 0, 1), e.g. {wrong[0]}; remove them from the training folder"
        )


def load_data(config: TrainConfig, models_dir: str | None) -> tuple[ChipSet, list[ChipSet]]:
    spec = storage_spec(model_crop(config), config.model.border)
    data = config.data

    def chips(directory: Path, limit: int | None) -> ChipSet:
        return load_chips(
            directory, spec, data.cache, DetectorConfig(), limit=limit,
            models_dir=models_dir, workers=data.workers,
        )  # fmt: skip

    train = chips(data.train, data.train_limit)
    check_training_split(train)
    return train, [chips(directory, data.dev_limit) for directory in data.dev]


def new_net(config: TrainConfig) -> GenderAgeNet:
    """The recipe's network with untrained weights."""
    model = config.model
    return GenderAgeNet(model.age_bins, model.dropout, model.backbone, model.size)


def sample_weights(age: np.ndarray, bin_years: int, power: float) -> np.ndarray:
    """Per-image sampling weights that lift rare ages: (images in its age bin) ** -power."""
    bins = (age // bin_years).astype(int)
    counts = np.bincount(bins)
    weights = counts[bins].astype(np.float64) ** -power
    return weights / weights.sum()


def build_state(config: TrainConfig, device: torch.device, models_dir: str | None) -> State:
    net = new_net(config)
    weights = config.model.pretrained_weights
    if weights is not None:
        net.load_imagenet(ensure_model(weights, models_dir))
    # torch's stubs omit `to`'s memory_format keyword, which Module.to accepts.
    net = net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = AveragedModel(
        net, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True
    )
    heads = [*net.gender.parameters(), *net.age.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(net.features.parameters()), "lr": config.optim.backbone_lr},
            {"params": heads, "lr": config.optim.head_lr},
        ],
        weight_decay=config.optim.weight_decay,
    )
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return State(net, ema, optimizer)


def set_learning_rate(state: State, config: TrainConfig, steps_per_epoch: int) -> None:
    """Linear warm-up, then cosine decay to zero over all epochs."""
    total = config.optim.epochs * steps_per_epoch
    warmup = max(1, int(config.optim.warmup_epochs * steps_per_epoch))
    if state.step < warmup:
        factor = (state.step + 1) / warmup
    else:
        factor = 0.5 * (1 + np.cos(np.pi * (state.step - warmup) / max(1, total - warmup)))
    for group in state.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def loss_of(
    config: TrainConfig,
    gender: torch.Tensor,
    age_logits: torch.Tensor,
    age: torch.Tensor,
    is_male: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    settings = config.loss
    target = age_targets(
        age.cpu(),
        config.model.age_bins,
        settings.age_sigma_min,
        settings.age_sigma_per_year,
        settings.age_sigma_max,
    ).to(age.device)
    log_probs = F.log_softmax(age_logits, dim=1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_probs)).sum(1).mean()
    expected = log_probs.exp() @ torch.arange(
        config.model.age_bins, dtype=torch.float32, device=age.device
    )
    l1 = (expected - age.clamp(max=config.model.age_bins - 1)).abs().mean()
    gender_ce = F.cross_entropy(gender, is_male.long(), label_smoothing=settings.gender_smoothing)
    total = kl + settings.age_l1 * l1 + settings.gender * gender_ce
    return total, {
        "loss": total.item(),
        "age_kl": kl.item(),
        "age_l1": l1.item(),
        "gender_ce": gender_ce.item(),
    }


def train_epoch(
    state: State,
    config: TrainConfig,
    train: ChipSet,
    rng: np.random.Generator,
    device: torch.device,
) -> dict[str, float]:
    """One epoch of len(train) images drawn with age-balancing weights."""
    weights = sample_weights(train.age, config.balance.bin_years, config.balance.power)
    order = rng.choice(len(train), size=len(train), replace=True, p=weights)
    batch_size = config.optim.batch_size
    steps = len(order) // batch_size
    totals: dict[str, float] = {}
    state.net.train()
    for at in range(0, steps * batch_size, batch_size):
        index = np.sort(order[at : at + batch_size])
        images = augment(train.chips[index], config.model.size, rng, config.augment)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        age = torch.from_numpy(train.age[index]).to(device)
        is_male = torch.from_numpy(train.is_male[index]).to(device)
        set_learning_rate(state, config, steps)
        gender, age_logits = state.net(images)
        loss, parts = loss_of(config, gender, age_logits, age, is_male)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.ema.update_parameters(state.net)
        state.step += 1
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value / steps
    return totals


@torch.no_grad()
def predict_chips(
    net: torch.nn.Module, chips: np.ndarray, size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(age, p_male) for stored chips, from their centre crop (what the pipeline cuts)."""
    net.eval()
    ages, p_males = [], []
    bins = None
    for at in range(0, len(chips), 256):
        images = (
            centre_crop(chips[at : at + 256], size)
            .to(device)
            .contiguous(memory_format=torch.channels_last)
        )
        gender, age_logits = net(images)
        if bins is None:
            bins = torch.arange(age_logits.shape[1], dtype=torch.float32, device=device)
        ages.append((torch.softmax(age_logits, 1) @ bins).cpu().numpy())
        p_males.append(torch.softmax(gender, 1)[:, 1].cpu().numpy())
    return np.concatenate(ages), np.concatenate(p_males)


def chip_metrics(chips: ChipSet, age: np.ndarray, p_male: np.ndarray) -> dict[str, float]:
    """Age MAE and gender accuracy overall, per age band and per source."""
    error = np.abs(age - chips.age)
    right = (p_male >= 0.5) == chips.is_male
    metrics = {"n": len(chips), "age_mae": float(error.mean()), "gender_acc": float(right.mean())}
    for low, high in AGE_BANDS:
        band = (chips.age >= low) & (chips.age < high)
        name = f"{low}-{high - 1}" if high < 200 else f"{low}+"
        metrics[f"mae_{name}"] = float(error[band].mean()) if band.any() else float("nan")
        metrics[f"gender_{name}"] = float(right[band].mean()) if band.any() else float("nan")
    for source in np.unique(chips.source):
        mask = chips.source == source
        metrics[f"mae_{source}"] = float(error[mask].mean())
        metrics[f"gender_{source}"] = float(right[mask].mean())
    return metrics


def validate(
    state: State, config: TrainConfig, dev: list[ChipSet], device: torch.device
) -> dict[str, dict[str, float]]:
    """The EMA model's metrics on each development folder's chips."""
    results = {}
    for index, chips in enumerate(dev):
        age, p_male = predict_chips(state.ema.module, chips.chips, config.model.size, device)
        results[config.data.dev[index].name] = chip_metrics(chips, age, p_male)
    return results


def selection_score(results: dict[str, dict[str, float]]) -> float:
    """Lower is better: mean age MAE over the dev folders plus 20 years per unit of gender error
    (one point of gender accuracy weighs as much as 0.2 years of MAE)."""
    if not results:
        return 0.0
    return float(np.mean([r["age_mae"] + 20 * (1 - r["gender_acc"]) for r in results.values()]))


def save_checkpoint(
    state: State, path: Path, config: TrainConfig, rng: np.random.Generator
) -> None:
    """Write atomically, so that a run killed while saving keeps its previous checkpoint."""
    checkpoint = {
        "recipe": config.digest(),
        "net": state.net.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "best_score": state.best_score,
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    }
    partial = path.with_name(path.name + ".part")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def resume(state: State, path: Path, config: TrainConfig, rng: np.random.Generator) -> None:
    """Carry on from `path`: weights, optimizer, schedule position and random streams."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["recipe"] != config.digest():
        raise ValueError(
            f"{path} was trained with another recipe ({checkpoint['recipe']}, this config is "
            f"{config.digest()}); use --fresh to start over, or another --out folder"
        )
    state.net.load_state_dict(checkpoint["net"])
    state.ema.load_state_dict(checkpoint["ema"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
    state.best_score = checkpoint["best_score"]
    rng.bit_generator.state = checkpoint["numpy_rng"]
    torch.set_rng_state(checkpoint["torch_rng"])
    log.info("resuming %s after epoch %d of %d", path, state.epoch, config.optim.epochs)


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but PyTorch sees no CUDA device here")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _log_epoch(out_dir: Path, record: dict) -> None:
    with open(out_dir / "log.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
    dev = "; ".join(
        f"{name} MAE {r['age_mae']:.2f} gender {r['gender_acc']:.1%}"
        for name, r in record["dev"].items()
    )
    log.info(
        "epoch %d/%d: loss %.3f (age L1 %.2f) in %.0f s; %s%s",
        record["epoch"], record["epochs"], record["train"]["loss"], record["train"]["age_l1"],
        record["seconds"], dev or "no dev sets", " (best so far)" if record["best"] else "",
    )  # fmt: skip


def train(
    config: TrainConfig, out_dir: Path, *, fresh: bool = False, models_dir: str | None = None
) -> dict:
    """Train (resuming from out_dir/last.pt unless `fresh`), then export the best epoch."""
    device = pick_device(config.device)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_set, dev = load_data(config, models_dir)
    log.info("training on %d chips (%s), device %s", len(train_set), config.data.train, device)
    state = build_state(config, device, models_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not fresh and (out_dir / LAST).is_file():
        resume(state, out_dir / LAST, config, rng)
    for epoch in range(state.epoch, config.optim.epochs):
        started = time.monotonic()
        losses = train_epoch(state, config, train_set, rng, device)
        results = validate(state, config, dev, device)
        state.epoch = epoch + 1
        score = selection_score(results)
        best = not results or score < state.best_score
        if best:
            state.best_score = score
            save_checkpoint(state, out_dir / BEST, config, rng)
        save_checkpoint(state, out_dir / LAST, config, rng)
        record = {
            "epoch": state.epoch,
            "epochs": config.optim.epochs,
            "train": losses,
            "dev": results,
            "score": score,
            "best": best,
            "seconds": time.monotonic() - started,
        }
        _log_epoch(out_dir, record)
    return export(config, out_dir, dev[0] if dev else None)


def export(config: TrainConfig, out_dir: Path, check_on: ChipSet | None = None) -> dict:
    """Export the best checkpoint's averaged weights to out_dir/genderage.onnx and check ONNX
    Runtime against PyTorch on real chips (or random input without dev data)."""
    checkpoint = torch.load(out_dir / BEST, map_location="cpu", weights_only=False)
    net = new_net(config)
    net.load_state_dict(
        {k[len("module.") :]: v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    )
    net.eval()
    spec = model_crop(config)
    metadata = {
        "agestream.contract": "genderage-112" if spec.size == 112 else f"genderage-{spec.size}",
        "agestream.crop": json.dumps(
            {"size": spec.size, "align": spec.align, "margin": spec.margin}
        ),
        "agestream.recipe": config.digest(),
        "agestream.epoch": str(checkpoint["epoch"]),
        "agestream.licence": LICENCE,
        "agestream.flip_average": str(config.export.flip_average).lower(),
    }
    path = out_dir / ONNX_NAME
    export_onnx(net, path, spec.size, metadata, config.export.flip_average)
    sample = (
        centre_crop(check_on.chips[:16], spec.size).numpy()
        if check_on is not None
        else np.random.default_rng(0).random((4, 3, spec.size, spec.size), np.float32)
    )
    difference = check_onnx(net, path, sample, config.export.flip_average)
    if difference > 1e-3:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {difference:.2g}")
    summary = {
        "onnx": str(path),
        "sha256": sha256_of(path),
        "bytes": path.stat().st_size,
        "epoch": checkpoint["epoch"],
        "max_abs_diff": difference,
    }
    log.info(
        "exported %s (%d bytes, sha256 %s); ONNX Runtime vs PyTorch max |diff| %.2g",
        path,
        summary["bytes"],
        summary["sha256"],
        difference,
    )
    return summary
