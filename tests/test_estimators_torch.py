"""torch-resnet50 on random ResNet50s saved as state_dicts and TorchScript."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs every extra: there these tests must run
    pytest.importorskip("torch")

import torch
from torch import nn

from estimators import ModelLoadError, create_estimator
from estimators.torch_age import ResNet50
from stream.config import EstimatorConfig

# The frameworks warn about their own deprecations (TorchScript, numpy 2 copy keyword).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("torch")
    torch.manual_seed(0)
    linear = ResNet50().eval()
    nn.init.zeros_(linear.fc.weight)
    linear.fc.bias.data.fill_(42.0)
    # A Linear-ReLU-Dropout-Linear head, saved the way training scripts wrap it.
    mlp = ResNet50(nn.Sequential(nn.Linear(2048, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 1)))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in mlp.state_dict().items()}}
    paths = {
        "linear": folder / "age_resnet50.pt",
        "wrapped": folder / "checkpoint.pth",
        "script": folder / "age_scripted.pt",
        "two-outputs": folder / "two.pt",
    }
    torch.save(linear.state_dict(), paths["linear"])
    torch.save(wrapped, paths["wrapped"])
    torch.jit.save(torch.jit.script(linear), paths["script"])
    torch.save(ResNet50(nn.Linear(2048, 2)).state_dict(), paths["two-outputs"])
    return paths


def estimator_for(path: Path):
    return create_estimator(EstimatorConfig(name="torch-resnet50", model=str(path)))


def crops_for(estimator, n: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        spec: rng.integers(0, 256, (n, spec.size, spec.size, 3), dtype=np.uint8)
        for spec in estimator.crops
    }


def test_given_torchvision_names_then_resnet50_has_torchvisions_keys_and_size() -> None:
    model = ResNet50(nn.Linear(2048, 1000))
    state = model.state_dict()
    assert len(state) == 320
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert {"layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.bias"} <= set(state)


@pytest.mark.parametrize("key", ["linear", "script"])
def test_given_a_bias_only_head_then_age_is_that_bias(models: dict[str, Path], key: str) -> None:
    estimator = estimator_for(models[key])
    [spec] = estimator.crops
    assert (spec.size, spec.align) == (128, "box")
    result = estimator.estimate(crops_for(estimator, 2))
    np.testing.assert_allclose(result.age, 42, rtol=1e-5)
    assert np.isnan(result.p_male).all() and np.isnan(result.age_confidence).all()


def test_given_a_wrapped_checkpoint_with_an_mlp_head_then_a_batch_equals_single_calls(
    models: dict[str, Path],
) -> None:
    estimator = estimator_for(models["wrapped"])
    crops = crops_for(estimator, 4)
    batched = estimator.estimate(crops)
    assert batched.age.shape == (4,)
    singles = [estimator.estimate({s: c[i : i + 1] for s, c in crops.items()}) for i in range(4)]
    np.testing.assert_allclose(batched.age, [s.age[0] for s in singles], rtol=1e-4, atol=1e-4)
    assert len(estimator.estimate({s: c[:0] for s, c in crops.items()})) == 0


def test_given_a_head_with_two_outputs_then_error_says_it_must_regress_one(
    models: dict[str, Path],
) -> None:
    with pytest.raises(ModelLoadError, match=r"output \(n, 1\), but this one outputs \(1, 2\)"):
        estimator_for(models["two-outputs"])


def test_given_a_file_that_is_no_checkpoint_then_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "age.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match=f"cannot load torch-resnet50 model {bad}") as error:
        estimator_for(bad)
    assert "\n" not in str(error.value)


def test_given_a_missing_file_then_error_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="PyTorch model file not found"):
        estimator_for(tmp_path / "none.pt")
