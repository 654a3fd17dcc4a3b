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
from estimators.train.config import AugmentSettings, TrainConfig, check_data, load_train_config
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
            "model": {"pretrained": False, "size": 112},
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
        ("data: {train: x}\noptim: {warmup_epochs: .inf}\n",
         r"optim.warmup_epochs: Input should be a finite number \(got inf\)"),
        ("data: {train: x}\nloss: {age_l1: .nan}\n", "loss.age_l1: Input should be a finite"),
        ("data: {train: x}\naugment: {low_res_px: [80, 24]}\n",
         r"augment.low_res_px: a \[low, high\] range needs low <= high \(got \(80, 24\)\)"),
        ("data: {train: x}\naugment: {jpeg_quality: [90, 30]}\n",
         r"augment.jpeg_quality: a \[low, high\] range needs low <= high"),
        ("data: {train: x}\naugment: {motion_blur_px: [9, 3]}\n",
         r"augment.motion_blur_px: a \[low, high\] range needs low <= high"),
        ("data: {train: x}\naugment: {low_light_gain: [0.7, 0.3]}\n",
         r"augment.low_light_gain: a \[low, high\] range needs low <= high"),
        ("data: {train: x}\naugment: {jpeg_quality: [0, 90]}\n",
         "augment.jpeg_quality.0: Input should be greater than or equal to 1"),
        ("data: {train: x}\nloss: {age_sigma_min: 5, age_sigma_max: 2}\n",
         "loss: age_sigma_min 5.0 is above age_sigma_max 2.0"),
        ("data: {train: x}\nseed: -1\n", "seed: Input should be greater than or equal to 0"),
        ("data: {train: x}\noptim: {batch_size: '64'}\n",
         r"optim.batch_size: Input should be a valid integer \(got '64'\)"),
        ("data: {train: x}\nexport: {flip_average: 'yes'}\n",
         "export.flip_average: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_given_a_bad_recipe_then_one_error_names_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_the_packaged_recipe_loads() -> None:
    recipe = load_train_config()
    assert recipe.model.size == 112 and recipe.model.pretrained_weights == "mobilenet-v2-imagenet"


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


def test_given_motion_blur_and_low_light_then_faces_are_smeared_and_darkened() -> None:
    faces = real_chips(16)
    plain = AugmentSettings(
        flip=False, scale=0, rotate_deg=0, shift_px=0, brightness=0, contrast=0,
        saturation=0, grey=0, low_res=0, jpeg=0,
    )  # fmt: skip
    still = augment(faces, 112, np.random.default_rng(0), plain)
    blurred = augment(
        faces, 112, np.random.default_rng(0),
        plain.model_copy(update={"motion_blur": 1.0, "motion_blur_px": (7, 7)}),
    )  # fmt: skip
    dim = augment(faces, 112, np.random.default_rng(0), plain.model_copy(update={"low_light": 1.0}))

    def detail(images: torch.Tensor) -> torch.Tensor:
        return (images[..., 1:, :] - images[..., :-1, :]).abs().mean((1, 2, 3)) + (
            images[..., 1:] - images[..., :-1]
        ).abs().mean((1, 2, 3))

    # A 7-px smear in any direction removes detail from every face but keeps its brightness.
    assert torch.all(detail(blurred) < 0.8 * detail(still))
    assert torch.allclose(blurred.mean((1, 2, 3)), still.mean((1, 2, 3)), atol=0.02)
    # Dim light: at most 70 % of the brightness, with grain that was not in the face.
    assert torch.all(dim.mean((1, 2, 3)) <= 0.72 * still.mean((1, 2, 3)))
    residual = dim - still * (
        dim.mean((1, 2, 3), keepdim=True) / still.mean((1, 2, 3), keepdim=True)
    )
    assert 0.01 < float(residual.std()) < 0.06


def real_chips(count: int) -> np.ndarray:
    """Stored-size (128 px) RGB chips of real training faces, resized from the 200 px crops."""
    import cv2

    paths = sorted((require(FACES / "train") / "utkface").glob("*.jpg"))[:count]
    return np.stack([cv2.resize(cv2.imread(str(p))[:, :, ::-1], (128, 128)) for p in paths])


def test_efficientnet_lite0_starts_from_its_imagenet_weights_with_their_normalization(
    tmp_path: Path,
) -> None:
    from estimators.train.model import NORMALIZATION, GenderAgeNet, check_onnx, export_onnx
    from stream.models import ensure_model

    net = GenderAgeNet(backbone="efficientnet-lite0", size=112)
    net.load_imagenet(ensure_model("efficientnet-lite0-imagenet"))  # every trunk weight, strict
    stem, stem_bn = net.features._conv_stem, net.features._bn0
    faces = torch.from_numpy(real_chips(64)).permute(0, 3, 1, 2).float() / 255.0

    def mismatch(backbone: str) -> float:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[backbone])
        with torch.no_grad():
            response = stem((faces - mean) / std)
        return float((response.mean((0, 2, 3)) - stem_bn.running_mean).abs().mean())

    # The stem's stored statistics fit TensorFlow's (x - 0.5) / 0.5, the Lite weights' own
    # input, far better than torchvision's ImageNet normalization.
    assert mismatch("efficientnet-lite0") < 0.6 * mismatch("mobilenet-v2")
    net.eval()
    with torch.no_grad():
        assert net.features(faces[:2, :, 8:120, 8:120]).shape == (2, 1280, 4, 4)
    path = tmp_path / "lite0.onnx"
    export_onnx(net, path, 112, {}, flip_average=False)
    assert check_onnx(net, path, faces[:4, :, 8:120, 8:120].numpy(), flip_average=False) < 1e-4


def recipe_file(tmp_path: Path, data: str, optim: str = "{}") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {data}\noptim: {optim}\n")
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{train: nowhere}", "data.train: folder nowhere not found"),
        ("{train: FACES, dev: [FACES, gone]}", "data.dev: folder gone not found"),
    ],
)
def test_given_a_missing_data_folder_then_one_error_names_the_key_before_any_chip(
    tmp_path: Path, data: str, message: str
) -> None:
    path = recipe_file(tmp_path, data.replace("FACES", str(FACES / "dev")))
    with pytest.raises(ConfigError) as raised:
        check_data(load_train_config(path), path)
    assert str(raised.value).startswith(f"{path}: {message}")


def test_given_a_batch_larger_than_the_training_images_then_one_error_names_the_key(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "labels.csv").write_text("file,age,gender\na.jpg,30,male\nb.jpg,40,female\n")
    path = recipe_file(tmp_path, f"{{train: {folder}}}", "{batch_size: 8}")
    with pytest.raises(ConfigError) as raised:
        check_data(load_train_config(path), path)
    assert str(raised.value) == (
        f"{path}: optim.batch_size: 8 is more than the 2 training images of {folder}; lower it "
        "or add images"
    )


def test_given_out_inside_the_package_then_train_refuses_and_the_shipped_model_is_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import estimators
    from stream.cli import main
    from stream.models import sha256_of

    models = Path(estimators.__file__).parent / "models"
    shipped = sha256_of(models / "genderage.onnx")
    for extra in ([], ["--overwrite-model"]):
        assert main(["train", "--out", str(models), "--export-only", *extra]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"agestream: error: --out {models} is inside the installed agestream "
            f"({models.parent.resolve()}), whose models are pinned by hash; choose a folder "
            "outside it, e.g. runs/genderage"
        ]
    assert sha256_of(models / "genderage.onnx") == shipped


def test_given_a_model_no_run_exported_then_refused_unless_overwrite_model(tmp_path: Path) -> None:
    from stream.cli import check_train_out
    from stream.outputs import OutputError

    (tmp_path / "genderage.onnx").write_bytes(b"someone's model")
    with pytest.raises(OutputError) as raised:
        check_train_out(tmp_path, overwrite_model=False)
    assert str(raised.value) == (
        f"{tmp_path / 'genderage.onnx'} exists and no training run in {tmp_path} exported it "
        "(no best.pt there); choose another --out folder, or add --overwrite-model to replace it"
    )
    check_train_out(tmp_path, overwrite_model=True)
    # A run's own folder (its checkpoints beside its export) resumes and re-exports.
    (tmp_path / "best.pt").write_bytes(b"checkpoint")
    check_train_out(tmp_path, overwrite_model=False)
