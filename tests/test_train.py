"""`agestream train` on a tiny recipe: chips through the pipeline, the loop, resume, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs the train extra: there these tests must run
    pytest.importorskip("torch", reason="needs the train extra: pip install -e '.[train]'")
    pytest.importorskip("onnx", reason="needs the train extra: pip install -e '.[train]'")

import torch

import estimators.train.loop as loop
from estimators import create_estimator
from estimators.train.augment import age_targets, augment, centre_crop
from estimators.train.config import AugmentSettings, TrainConfig, load_train_config
from stream.config import ConfigError, EstimatorConfig
from stream.faceset import split_of
from tests.conftest import SHARED, require

FACES = SHARED / "data" / "faces"


def tiny_recipe(tmp_path: Path, flip_average: bool = False, **optim) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {
                "train": str(require(FACES / "train")),
                "dev": [str(FACES / "dev")],
                "train_limit": 24,
                "dev_limit": 8,
                "cache": str(tmp_path / "chips"),
                "workers": 1,
            },
            "model": {"pretrained": None, "size": 112},
            "optim": {"epochs": 2, "batch_size": 8, **optim},
            "export": {"flip_average": flip_average},
            "threads": 2,
        }
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["net"]


def test_given_a_tiny_recipe_when_interrupted_and_resumed_then_it_ends_as_an_unbroken_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tiny_recipe(tmp_path)
    unbroken = loop.train(recipe, tmp_path / "unbroken")

    real_epoch, calls = loop.train_epoch, []

    def stop_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        loop.train(recipe, tmp_path / "resumed")
    monkeypatch.setattr(loop, "train_epoch", real_epoch)
    resumed = loop.train(recipe, tmp_path / "resumed")

    log = [
        json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    assert [record["epoch"] for record in log] == [1, 2]
    assert set(log[0]["dev"]["dev"]) >= {"age_mae", "gender_acc", "mae_0-9", "mae_utkface"}
    a, b = weights(tmp_path / "unbroken" / "last.pt"), weights(tmp_path / "resumed" / "last.pt")
    assert all(torch.allclose(a[key].float(), b[key].float(), atol=1e-5) for key in a)
    assert resumed["epoch"] == unbroken["epoch"] and resumed["max_abs_diff"] < 1e-4


def test_given_an_exported_model_then_the_registry_loads_it_with_its_crop_and_distribution(
    tmp_path: Path,
) -> None:
    summary = loop.train(tiny_recipe(tmp_path, flip_average=True, epochs=1), tmp_path / "run")
    estimator = create_estimator(EstimatorConfig(name="genderage", model=summary["onnx"]))
    (spec,) = estimator.crops
    assert (spec.size, spec.align, spec.margin) == (112, "warp", 1.25)
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    together = estimator.estimate({spec: crops})
    alone = [estimator.estimate({spec: crops[i : i + 1]}) for i in range(3)]
    assert together.age_std is not None and np.all(together.age_std > 0)
    assert np.allclose(together.age, [e.age[0] for e in alone], atol=1e-3)
    assert np.allclose(together.p_male, [e.p_male[0] for e in alone], atol=1e-5)
    # Averaged over both views, a face and its mirror image get the same estimate.
    mirrored = estimator.estimate({spec: crops[:, :, ::-1]})
    assert np.allclose(mirrored.age, together.age, atol=1e-3)
    assert np.allclose(mirrored.p_male, together.p_male, atol=1e-5)


def test_given_dev_or_reserved_images_in_the_training_folder_then_training_refuses(
    tmp_path: Path,
) -> None:
    dev_image = next(
        p for p in sorted(require(SHARED / "data" / "utkface-dev").glob("*.jpg"))
        if split_of(p.name) == 0
    )  # fmt: skip
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / dev_image.name).symlink_to(dev_image)
    (folder / "labels.csv").write_text(f"file,age,gender\n{dev_image.name},30,male\n")
    recipe = tiny_recipe(tmp_path).model_copy(
        update={"data": tiny_recipe(tmp_path).data.model_copy(update={"train": folder})}
    )
    with pytest.raises(loop.ReservedDataError, match="development or reserved split"):
        loop.load_data(recipe, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {train: x}\noptim: {epochs: 0}\n", "optim.epochs: Input should be greater"),
        ("data: {train: x}\nmodel: {sise: 3}\n", "model.sise: Extra inputs are not permitted"),
        ("optim: {epochs: 2}\n", "data: Field required"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_given_a_bad_recipe_then_one_error_names_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_the_packaged_recipe_loads() -> None:
    recipe = load_train_config()
    assert recipe.model.size == 112 and recipe.model.pretrained == "mobilenet-v2-imagenet"


def test_given_stored_chips_then_augmentation_at_rest_is_the_centre_crop() -> None:
    chips = np.random.default_rng(1).integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    still = AugmentSettings(
        flip=False, scale=0, rotate_deg=0, shift_px=0, brightness=0, contrast=0,
        saturation=0, grey=0, low_res=0, jpeg=0,
    )  # fmt: skip
    views = augment(chips, 112, np.random.default_rng(0), still)
    assert torch.allclose(views, centre_crop(chips, 112), atol=1e-5)
    moved = augment(chips, 112, np.random.default_rng(0), AugmentSettings())
    assert moved.shape == (4, 3, 112, 112) and not torch.allclose(moved, views, atol=0.05)


def test_age_targets_peak_at_the_label_and_widen_with_age() -> None:
    targets = age_targets(torch.tensor([3.0, 70.0]), 101, 1.0, 0.06, 4.0)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets.argmax(1).tolist() == [3, 70]
    assert targets[0].max() > 2 * targets[1].max()
