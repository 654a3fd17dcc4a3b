"""The estimator registry, config wiring, crops and combined estimators, without frameworks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import estimators
from estimators import (
    ESTIMATORS,
    CropSpec,
    EstimatorInfo,
    InputSpec,
    MissingExtraError,
    create_estimator,
    estimator_rows,
    format_estimator_rows,
)
from estimators.combined import Combined, combine
from stream.analyzer import FaceAnalyzer, box_crops, cut_crops
from stream.config import ConfigError, EstimatorConfig, load_config
from stream.reports.estimator_bench import bench_estimator, format_bench
from stream.types import Estimates, Faces


def estimates(age: list[float], p_male: list[float]) -> Estimates:
    return Estimates(
        age=np.array(age, np.float32),
        p_male=np.array(p_male, np.float32),
        age_confidence=np.ones(len(age), np.float32),
    )


def test_given_unknown_estimator_then_error_lists_every_valid_name() -> None:
    with pytest.raises(ConfigError) as error:
        create_estimator(EstimatorConfig(name="nope"))
    assert "Invalid estimator 'nope', expecting one of: " + ", ".join(sorted(ESTIMATORS)) in str(
        error.value
    )
    assert set(ESTIMATORS) == {
        "genderage",
        "onnx-genderage",
        "vit-fairface",
        "siglip-age",
        "keras-resnet50",
        "torch-resnet50",
    }


def test_given_missing_framework_then_error_names_the_extra_to_install(monkeypatch) -> None:
    fake = EstimatorInfo("fake", "no_such_module:Fake", ("age",), "nowhere", ("no_such_fw",), "fw")
    monkeypatch.setitem(ESTIMATORS, "fake", fake)
    with pytest.raises(MissingExtraError, match=r"needs no_such_fw.*pip install 'agestream\[fw\]'"):
        create_estimator(EstimatorConfig(name="fake"))


def test_given_a_fresh_interpreter_when_estimators_is_imported_then_no_framework_is() -> None:
    code = (
        "import sys, estimators; "
        "print(sorted(m for m in ('torch', 'transformers', 'keras', 'tensorflow') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_given_registry_then_models_rows_say_what_each_predicts_and_where_from() -> None:
    rows = {row["name"]: row for row in estimator_rows()}
    assert rows["onnx-genderage"]["predicts"] == "age + gender"
    assert rows["vit-fairface"]["predicts"] == "age"
    assert "dima806/fairface_age_image_detection" in rows["vit-fairface"]["source"]
    assert all(row["install"] for row in rows.values())
    table = format_estimator_rows(estimator_rows())
    assert table.splitlines()[0].split() == ["name", "predicts", "install", "source"]


def test_given_age_and_gender_keys_then_config_parses_them(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "estimator:\n  age: vit-fairface\n  gender: onnx-genderage\n"
        "  options:\n    vit-fairface: {model: ./vit, margin: 1.3}\n"
    )
    config = load_config(path).estimator
    assert (config.age, config.gender) == ("vit-fairface", "onnx-genderage")
    settings = estimators.settings_for(config, "vit-fairface")
    assert settings.model == "./vit"
    assert dict(settings.options) == {"margin": 1.3}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (EstimatorConfig(gender="vit-fairface"), "'vit-fairface' does not predict gender"),
        (EstimatorConfig(options={"vit-fairfac": {}}), "Invalid estimator 'vit-fairfac'"),
        (EstimatorConfig(options={"genderage": {"nope": 1}}), "unknown option 'nope'"),
        (
            EstimatorConfig(name="onnx-genderage", options={"onnx-genderage": {"contract": "x"}}),
            "contract: invalid value 'x'",
        ),
    ],
)
def test_given_bad_estimator_config_then_config_error_says_what(
    config: EstimatorConfig, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        create_estimator(config)


def test_given_options_that_are_not_a_mapping_then_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("estimator:\n  options:\n    vit-fairface: [1]\n")
    expected = "estimator.options.vit-fairface: Input should be a valid dictionary"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_given_age_groups_of_the_wrong_width_then_error_says_expected_and_actual() -> None:
    with pytest.raises(ValueError, match=r"age_groups .* \(2, 3\), but got shape \(2, 2\)"):
        Estimates(
            age=np.zeros(2, np.float32),
            p_male=np.zeros(2, np.float32),
            age_confidence=np.zeros(2, np.float32),
            age_groups=np.zeros((2, 2), np.float32),
            age_group_labels=("a", "b", "c"),
        )


def test_given_age_and_gender_estimates_then_combine_takes_each_from_its_own() -> None:
    combined = combine(estimates([30, 40], [np.nan, np.nan]), estimates([1, 2], [0.2, 0.9]))
    np.testing.assert_allclose(combined.age, [30, 40])
    np.testing.assert_allclose(combined.p_male, [0.2, 0.9])


def test_given_a_box_then_the_crop_is_centred_and_outside_the_frame_is_black() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 40:60] = 255  # a 20 px white square: the "face"
    crops = box_crops(image, np.array([[40, 40, 60, 60], [90, 90, 110, 110]], np.float32), 40, 2)
    assert crops.shape == (2, 40, 40, 3)
    # Margin 2: the face fills the middle half of the crop.
    assert crops[0, 12:28, 12:28].min() == 255
    assert crops[0, :8].max() == 0
    # A box at the corner: the part outside the frame is black.
    assert crops[1, 25:, 25:].max() == 0


def test_given_input_spec_then_prepare_normalizes_and_orders_channels() -> None:
    crops = np.zeros((1, 2, 2, 3), np.uint8)
    crops[..., 0] = 255
    spec = InputSpec(CropSpec(2), channels="BGR", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batch = spec.prepare(crops)
    assert batch.shape == (1, 3, 2, 2) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [-1, -1, 1])
    with pytest.raises(ValueError, match=r"crops must have shape \(n, 2, 2, 3\), but got"):
        spec.prepare(np.zeros((1, 3, 3, 3), np.uint8))


class StubEstimator:
    predicts = ("age",)

    def __init__(self, name: str, crops: tuple[CropSpec, ...], age: float) -> None:
        self.name, self.crops, self._age = name, crops, age
        self.seen: dict[CropSpec, np.ndarray] = {}

    def estimate(self, crops):
        self.seen = dict(crops)
        n = len(next(iter(crops.values())))
        return estimates([self._age] * n, [0.7] * n)


def test_given_two_estimators_sharing_a_crop_then_the_analyzer_cuts_each_spec_once(
    monkeypatch,
) -> None:
    shared, box = CropSpec(64), CropSpec(96, "box", 1.5)
    age, gender = StubEstimator("a", (shared,), 30), StubEstimator("g", (shared, box), 50)
    cut: list[CropSpec] = []

    def counting_cut(image, faces, spec):
        cut.append(spec)
        return cut_crops(image, faces, spec)

    monkeypatch.setattr("stream.analyzer.cut_crops", counting_cut)
    analyzer = FaceAnalyzer(detector=None, estimator=Combined(age, gender))  # type: ignore[arg-type]
    keypoints = np.array([[[40, 40], [60, 40], [50, 50], [50, 60], [35, 45], [65, 45]]], np.float32)
    faces = Faces(np.array([[30, 30, 70, 75]], np.float32), np.ones(1, np.float32), keypoints)
    result = analyzer.estimate(np.zeros((100, 100, 3), np.uint8), faces, {})
    assert sorted(cut, key=str) == sorted([shared, box], key=str)
    assert gender.seen[box].shape == (1, 96, 96, 3)
    np.testing.assert_allclose(result.age, [30])
    np.testing.assert_allclose(result.p_male, [0.7])


def test_given_the_default_estimator_then_bench_reports_ms_per_face_per_batch() -> None:
    rows = bench_estimator("onnx-genderage", EstimatorConfig(), batch_sizes=(1, 4), repeats=2)
    assert [row.batch for row in rows] == [1, 4]
    assert all(row.ms_per_face > 0 and row.faces_per_s > 0 for row in rows)
    assert rows[1].ms_per_face == pytest.approx(rows[1].ms_per_batch / 4)
    assert "onnx-genderage" in format_bench(rows)
