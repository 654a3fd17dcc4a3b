"""agestream's own GenderAge model as shipped: packaged, pinned, the default, and better than
Cydral's weights through the whole pipeline on real UTKFace dev faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from estimators import create_estimator
from estimators.onnx_genderage import OWN_MODEL
from stream.cli import main
from stream.config import Config, EstimatorConfig
from stream.models import MODELS, ensure_model, sha256_of
from tests.conftest import UTKFACE, require


def test_the_default_estimator_is_the_packaged_own_model_with_its_pinned_hash() -> None:
    assert Config().estimator.name == "genderage"
    path = ensure_model(OWN_MODEL)
    assert sha256_of(path) == MODELS[OWN_MODEL].sha256
    assert path.stat().st_size < 15 * 2**20
    estimator = create_estimator(EstimatorConfig())
    (spec,) = estimator.crops
    assert (spec.size, spec.align) == (112, "warp")
    crops = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    estimates = estimator.estimate({spec: crops})
    assert estimates.age_std is not None and len(estimates.age_std) == 8
    assert np.all((estimates.age >= 0) & (estimates.age <= 100))


def test_given_utkface_dev_faces_then_own_model_beats_cydral_through_the_pipeline(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "report.json"
    code = main(
        ["evaluate", str(require(UTKFACE)), "--limit", "200", "--compare", "onnx-genderage",
         "--json", str(report_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    reference = report["reference"]
    assert report["estimator"] == "genderage" and report["detected"] >= 196
    # All 1,967 images: 4.0 against 6.1 years; on 200, a margin well inside that gap.
    assert report["age_mae"] <= 0.85 * reference["age_mae_on_detected"]
    assert report["gender_acc"] >= reference["gender_acc_on_detected"]
    assert report["gender_acc_15_plus"] >= 0.93
