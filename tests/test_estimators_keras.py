"""keras-resnet50 on tiny regressors saved as .keras and .h5."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs every extra: there these tests must run
    pytest.importorskip("keras")

import keras

from estimators import ModelLoadError, create_estimator
from estimators.keras_age import correct_age
from stream.config import EstimatorConfig

# The frameworks warn about their own deprecations (TorchScript, numpy 2 copy keyword).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_regressor(bias: float | None = None) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((256, 256, 3))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(1)
    model = keras.Model(inputs, dense(x))
    if bias is not None:  # zero weights: the output is the bias whatever the face
        dense.set_weights([np.zeros((4, 1), np.float32), np.array([bias], np.float32)])
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keras")
    paths = {
        "keras": folder / "age.keras",
        "h5": folder / "age.h5",
        "seventy": folder / "seventy.keras",
        "wrong-input": folder / "small.keras",
    }
    tiny_regressor().save(paths["keras"])
    tiny_regressor().save(paths["h5"])
    tiny_regressor(70.0).save(paths["seventy"])
    small = keras.Sequential(
        [keras.Input((64, 64, 3)), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    small.save(paths["wrong-input"])
    return paths


def estimator_for(path: Path, **options):
    options = {"model": str(path), **options}
    return create_estimator(
        EstimatorConfig(name="keras-resnet50", options={"keras-resnet50": options})
    )


def crops_for(estimator, n: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        spec: rng.integers(0, 256, (n, spec.size, spec.size, 3), dtype=np.uint8)
        for spec in estimator.crops
    }


def test_given_ages_then_the_seeds_correction_applies_by_band_and_clamps() -> None:
    np.testing.assert_allclose(
        correct_age(np.array([0.5, 30, 50, 65, 70, 200])), [1, 30, 20, 29, 44, 100], rtol=1e-6
    )


@pytest.mark.parametrize("key", ["keras", "h5"])
def test_given_a_saved_model_then_a_batch_of_n_equals_n_single_calls(
    models: dict[str, Path], key: str
) -> None:
    estimator = estimator_for(models[key])
    [spec] = estimator.crops
    assert (spec.size, spec.align) == (256, "box")
    crops = crops_for(estimator, 4)
    batched = estimator.estimate(crops)
    assert batched.age.shape == batched.age_raw.shape == (4,)
    assert np.isnan(batched.p_male).all()
    singles = [estimator.estimate({s: c[i : i + 1] for s, c in crops.items()}) for i in range(4)]
    np.testing.assert_allclose(batched.age_raw, [s.age_raw[0] for s in singles], rtol=1e-4)
    assert len(estimator.estimate({s: c[:0] for s, c in crops.items()})) == 0


def test_given_a_raw_70_then_age_is_corrected_and_raw_is_kept(models: dict[str, Path]) -> None:
    result = estimator_for(models["seventy"]).estimate(
        crops_for(estimator_for(models["seventy"]), 2)
    )
    np.testing.assert_allclose(result.age_raw, 70, rtol=1e-5)
    np.testing.assert_allclose(result.age, 44, rtol=1e-5)
    plain = estimator_for(models["seventy"], bias_correction=False)
    np.testing.assert_allclose(plain.estimate(crops_for(plain, 1)).age, 70, rtol=1e-5)


def test_given_a_model_with_the_wrong_input_then_error_names_both_shapes(
    models: dict[str, Path],
) -> None:
    with pytest.raises(ModelLoadError, match=r"input \(N, 256, 256, 3\).*\(None, 64, 64, 3\)"):
        estimator_for(models["wrong-input"])


def test_given_a_file_that_is_no_keras_model_then_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "age.keras"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match=f"cannot load keras-resnet50 model {bad}") as error:
        estimator_for(bad)
    assert "\n" not in str(error.value)


def test_given_no_model_then_error_says_to_set_one() -> None:
    with pytest.raises(ModelLoadError, match="no default weights; set estimator.model"):
        create_estimator(EstimatorConfig(name="keras-resnet50"))
