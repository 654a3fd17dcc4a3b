"""onnx-genderage's single-file contracts: seed 004's GenderAge-112 and InsightFace's 96 px."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs every extra: there these tests must run
    pytest.importorskip("torch")
    pytest.importorskip("onnx")

import torch
from torch import nn

from estimators import ModelLoadError, create_estimator
from estimators.onnx_genderage import decode_genderage
from stream.config import EstimatorConfig

# torch's TorchScript-based exporter warns that it is deprecated; it is the light one.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class GenderAgeModel(nn.Module):
    """Seed 004's shape of network: RGB in [0, 1] -> female, male logits and age / 100."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def export(model: nn.Module, size: int, path: Path) -> Path:
    torch.onnx.export(
        model.eval(),
        (torch.zeros(1, 3, size, size),),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    constant = GenderAgeModel()
    # Zero weights: the output is the bias whatever the face.
    nn.init.zeros_(constant.head.weight)
    constant.head.bias.data = torch.tensor([0.0, 2.0, 0.35])
    return {
        "random-112": export(GenderAgeModel(), 112, folder / "genderage112.onnx"),
        "constant-112": export(constant, 112, folder / "constant112.onnx"),
        "random-96": export(GenderAgeModel(), 96, folder / "genderage.onnx"),
        "other-64": export(GenderAgeModel(), 64, folder / "other.onnx"),
    }


def crops_for(estimator, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        spec: rng.integers(0, 256, (n, spec.size, spec.size, 3), dtype=np.uint8)
        for spec in estimator.crops
    }


@pytest.mark.parametrize(
    ("key", "contract", "size", "margin"),
    [("random-112", "genderage-112", 112, 1.2), ("random-96", "insightface", 96, 1.5)],
)
def test_given_a_single_file_model_then_its_contract_is_read_from_the_input_shape(
    models: dict[str, Path], key: str, contract: str, size: int, margin: float
) -> None:
    estimator = create_estimator(EstimatorConfig(name="onnx-genderage", model=str(models[key])))
    assert estimator.contract == contract
    [spec] = estimator.crops
    assert (spec.size, spec.align, spec.margin) == (size, "box", margin)


def test_given_constant_logits_then_p_male_is_their_softmax_and_age_is_times_100(
    models: dict[str, Path],
) -> None:
    estimator = create_estimator(
        EstimatorConfig(name="onnx-genderage", model=str(models["constant-112"]))
    )
    result = estimator.estimate(crops_for(estimator, 3))
    np.testing.assert_allclose(result.p_male, 1 / (1 + np.exp(-2.0)), rtol=1e-5)
    np.testing.assert_allclose(result.age, 35.0, rtol=1e-5)
    assert np.isnan(result.age_confidence).all()


@pytest.mark.parametrize("key", ["random-112", "random-96"])
def test_given_a_batch_of_n_then_it_equals_n_single_calls(
    models: dict[str, Path], key: str
) -> None:
    estimator = create_estimator(EstimatorConfig(name="onnx-genderage", model=str(models[key])))
    crops = crops_for(estimator, 5)
    batched = estimator.estimate(crops)
    singles = [estimator.estimate({s: c[i : i + 1] for s, c in crops.items()}) for i in range(5)]
    assert batched.age.shape == batched.p_male.shape == (5,)
    np.testing.assert_allclose(batched.age, [s.age[0] for s in singles], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batched.p_male, [s.p_male[0] for s in singles], atol=1e-5)
    assert len(estimator.estimate({s: c[:0] for s, c in crops.items()})) == 0


def test_given_an_explicit_contract_that_does_not_fit_then_error_names_both_shapes(
    models: dict[str, Path],
) -> None:
    config = EstimatorConfig(
        name="onnx-genderage",
        model=str(models["random-112"]),
        options={"onnx-genderage": {"contract": "insightface"}},
    )
    with pytest.raises(ModelLoadError, match=r"needs input \(N, 3, 96, 96\)"):
        create_estimator(config)


def test_given_an_unknown_input_size_then_error_asks_for_the_contract(
    models: dict[str, Path],
) -> None:
    with pytest.raises(ModelLoadError, match="cannot tell the contract") as error:
        create_estimator(EstimatorConfig(name="onnx-genderage", model=str(models["other-64"])))
    assert "\n" not in str(error.value)


def test_given_a_file_that_is_not_onnx_then_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "genderage.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match=f"cannot load ONNX model {bad}") as error:
        create_estimator(EstimatorConfig(name="onnx-genderage", model=str(bad)))
    assert "\n" not in str(error.value)


def test_given_wrong_output_width_then_decode_says_expected_and_actual() -> None:
    with pytest.raises(ValueError, match=r"shape \(n, 3\), but got \(2, 2\)"):
        decode_genderage(np.zeros((2, 2), np.float32))
