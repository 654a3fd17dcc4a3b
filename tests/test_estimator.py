from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from estimators import ESTIMATORS, CropSpec, create_estimator
from estimators.onnx_genderage import ModelLoadError, create_session, decode
from stream.config import ConfigError, EstimatorConfig

WEIGHTS = np.array([0.25, *range(1, 81)], dtype=np.float32)


def test_given_one_hot_age_classes_then_age_is_that_class_weight() -> None:
    age = np.zeros((3, 81), np.float32)
    age[[0, 1, 2], [0, 30, 80]] = 1.0
    gender = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    estimates = decode(age, gender, WEIGHTS, male_column=1)
    np.testing.assert_allclose(estimates.age, [0.25, 30, 80])
    np.testing.assert_allclose(estimates.p_male, [0.1, 0.8, 0.5])
    np.testing.assert_allclose(estimates.age_confidence, [1, 1, 1])


def test_given_split_mass_then_age_is_the_expected_value() -> None:
    age = np.zeros((1, 81), np.float32)
    age[0, 20], age[0, 40] = 0.25, 0.75
    estimates = decode(age, np.array([[0.3, 0.7]], np.float32), WEIGHTS, male_column=1)
    assert estimates.age[0] == pytest.approx(35.0)
    assert estimates.age_confidence[0] == pytest.approx(0.75)


def test_given_wrong_output_shapes_then_error_says_expected_and_actual() -> None:
    with pytest.raises(
        ValueError, match=r"age output must have shape \(n, 81\), but got \(2, 80\)"
    ):
        decode(np.zeros((2, 80)), np.zeros((2, 2)), WEIGHTS, 1)
    with pytest.raises(
        ValueError, match=r"gender output must have shape \(2, 2\), but got \(3, 2\)"
    ):
        decode(np.zeros((2, 81)), np.zeros((3, 2)), WEIGHTS, 1)


def test_given_unknown_estimator_then_error_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="Invalid estimator 'nope', expecting one of: .*onnx"):
        create_estimator(EstimatorConfig(name="nope"))
    assert "onnx-genderage" in ESTIMATORS


def test_given_corrupt_model_file_then_one_line_error_names_it(tmp_path) -> None:
    bad = tmp_path / "age.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match=f"cannot load ONNX model {bad}") as error:
        create_session(bad)
    assert "\n" not in str(error.value)


def test_given_unavailable_provider_then_it_falls_back_to_cpu_with_a_warning(caplog) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here, so there is no fallback to see")
    caplog.set_level(logging.INFO)
    estimator = create_estimator(
        EstimatorConfig(
            name="onnx-genderage", providers=("CUDAExecutionProvider", "CPUExecutionProvider")
        )
    )
    assert estimator.crops == (CropSpec(32), CropSpec(64))
    assert any("CUDAExecutionProvider is not available" in r.message for r in caplog.records)
    assert any("runs on CPUExecutionProvider" in r.message for r in caplog.records)


def test_given_real_weights_then_a_batch_equals_single_calls() -> None:
    estimator = create_estimator(EstimatorConfig())
    rng = np.random.default_rng(0)
    chips = {
        spec: rng.integers(0, 256, (5, spec.size, spec.size, 3), dtype=np.uint8)
        for spec in estimator.crops
    }
    batched = estimator.estimate(chips)
    singles = [estimator.estimate({s: c[i : i + 1] for s, c in chips.items()}) for i in range(5)]
    np.testing.assert_allclose(batched.age, [s.age[0] for s in singles], rtol=1e-4)
    np.testing.assert_allclose(batched.p_male, [s.p_male[0] for s in singles], atol=1e-5)
    assert len(estimator.estimate({s: c[:0] for s, c in chips.items()})) == 0
