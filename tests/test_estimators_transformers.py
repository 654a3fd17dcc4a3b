"""vit-fairface and siglip-age on tiny random checkpoints saved with save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs every extra: there these tests must run
    pytest.importorskip("transformers")

import torch
from transformers import (
    SiglipConfig,
    SiglipForImageClassification,
    SiglipImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from estimators import ModelLoadError, create_estimator
from estimators.transformers_age import decode_groups, group_midpoint
from stream.config import EstimatorConfig

FAIRFACE = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
FACIAL_AGE = ("01-10", "11-20", "21-30", "31-40", "41-55", "56-65", "66-80", "80+")
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def label_maps(labels: tuple[str, ...]) -> dict:
    return {
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def save_vit(folder: Path, hot: int | None = None) -> Path:
    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=8, num_labels=9, **TINY, **label_maps(FAIRFACE))
    )
    if hot is not None:  # zero weights, one large bias: that group whatever the face
        torch.nn.init.zeros_(model.classifier.weight)
        model.classifier.bias.data = torch.full((9,), -20.0)
        model.classifier.bias.data[hot] = 20.0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_siglip(folder: Path) -> Path:
    torch.manual_seed(0)
    text = dict(TINY, vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = SiglipConfig(
        text_config=text,
        vision_config=dict(TINY, image_size=32, patch_size=8),
        num_labels=8,
        **label_maps(FACIAL_AGE),
    )
    SiglipForImageClassification(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "vit": save_vit(root / "vit"),
        "vit-30s": save_vit(root / "vit-30s", hot=4),
        "siglip": save_siglip(root / "siglip"),
    }


def crops_for(estimator, n: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        spec: rng.integers(0, 256, (n, spec.size, spec.size, 3), dtype=np.uint8)
        for spec in estimator.crops
    }


@pytest.mark.parametrize(
    ("label", "midpoint"),
    [("0-2", 1.5), ("10-19", 15), ("more than 70", 75), ("01-10", 6), ("41-55", 48.5), ("80+", 85)],
)
def test_given_group_labels_then_midpoints_cover_whole_years(label: str, midpoint: float) -> None:
    assert group_midpoint(label) == midpoint


def test_given_a_label_with_no_range_then_error_names_it() -> None:
    with pytest.raises(ValueError, match="cannot read an age range from label 'adult'"):
        group_midpoint("adult")


def test_given_split_probabilities_then_age_is_the_expected_midpoint() -> None:
    result = decode_groups(np.array([[0.5, 0.5, 0, 0, 0, 0, 0, 0]], np.float32), FACIAL_AGE)
    assert result.age[0] == pytest.approx((6 + 16) / 2)
    assert result.age_group_labels == FACIAL_AGE
    assert np.isnan(result.p_male).all()


@pytest.mark.parametrize(
    ("name", "key", "labels"),
    [("vit-fairface", "vit", FAIRFACE), ("siglip-age", "siglip", FACIAL_AGE)],
)
def test_given_a_saved_checkpoint_then_a_batch_of_n_equals_n_single_calls(
    checkpoints: dict[str, Path], name: str, key: str, labels: tuple[str, ...]
) -> None:
    estimator = create_estimator(EstimatorConfig(name=name, model=str(checkpoints[key])))
    assert estimator.predicts == ("age",)
    crops = crops_for(estimator, 4)
    batched = estimator.estimate(crops)
    assert batched.age_groups.shape == (4, len(labels))
    assert batched.age_group_labels == labels
    np.testing.assert_allclose(batched.age_groups.sum(axis=1), 1, rtol=1e-5)
    singles = [estimator.estimate({s: c[i : i + 1] for s, c in crops.items()}) for i in range(4)]
    np.testing.assert_allclose(batched.age, [s.age[0] for s in singles], rtol=1e-4)
    assert len(estimator.estimate({s: c[:0] for s, c in crops.items()})) == 0


def test_given_a_model_sure_of_30_39_then_age_is_35(checkpoints: dict[str, Path]) -> None:
    estimator = create_estimator(
        EstimatorConfig(name="vit-fairface", model=str(checkpoints["vit-30s"]))
    )
    result = estimator.estimate(crops_for(estimator, 2))
    np.testing.assert_allclose(result.age, 35, atol=1e-3)
    np.testing.assert_allclose(result.age_confidence, 1, atol=1e-5)


def test_given_age_from_vit_and_gender_from_onnx_then_both_are_filled(
    checkpoints: dict[str, Path],
) -> None:
    config = EstimatorConfig(
        age="vit-fairface", options={"vit-fairface": {"model": str(checkpoints["vit"])}}
    )
    estimator = create_estimator(config)
    assert len(estimator.crops) == 2  # the ViT box crop and genderage's 112 px aligned crop
    result = estimator.estimate(crops_for(estimator, 3))
    assert result.age_groups.shape == (3, 9)
    assert np.isfinite(result.p_male).all() and np.isfinite(result.age).all()


def test_given_a_folder_that_is_no_checkpoint_then_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"cannot load vit-fairface model {tmp_path}") as error:
        create_estimator(EstimatorConfig(name="vit-fairface", model=str(tmp_path)))
    assert "\n" not in str(error.value)
