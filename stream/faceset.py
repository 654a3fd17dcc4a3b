"""Labelled face-image folders (labels.csv or UTKFace names), their fixed split, and the face
the pipeline finds in each image: what `evaluate` scores and what training learns from."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detectors import Detector
from stream.align import pad_to_canvas
from stream.types import Faces

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
# The shared data's split: sha1(file name) % 5; 0 is development, 1 is reserved for
# the final evaluation, 2-4 are for training.
DEV_SPLIT, RESERVED_SPLIT, TRAIN_SPLITS = 0, 1, (2, 3, 4)
GENDERS = {"male": True, "m": True, "0": True, "female": False, "f": False, "1": False}
# A label's age: whole years in the digits 0-9 (str.isdigit also takes "²" and other
# scripts' digits), at most MAX_AGE (the oldest face in UTKFace is 116).
MAX_AGE = 120
_AGE = re.compile(r"[0-9]{1,3}")
LABEL_COLUMNS = ("file", "age", "gender")
# UTKFace's race field (its own labels), in its file names.
UTKFACE_ETHNICITIES = ("White", "Black", "Asian", "Indian", "Others")


@dataclass(frozen=True)
class LabelledImage:
    """One labelled face image; `source` names the data set it belongs to (e.g. utkface)."""

    path: Path
    age: int
    is_male: bool
    source: str
    # UTKFace's ethnicity label when the file name carries one, else "".
    ethnicity: str = ""


def utkface_ethnicity(name: str) -> str:
    """The ethnicity a UTKFace file name (`AGE_GENDER_RACE_DATE...`) records, else ""."""
    parts = name.split("_")
    if len(parts) < 4 or not parts[2].isdigit() or int(parts[2]) >= len(UTKFACE_ETHNICITIES):
        return ""
    return UTKFACE_ETHNICITIES[int(parts[2])]


def parse_age(text: str) -> int | None:
    """The age `text` gives (see MAX_AGE), or None when it is not one."""
    if not _AGE.fullmatch(text) or int(text) > MAX_AGE:
        return None
    return int(text)


def split_of(name: str) -> int:
    """The shared data's fixed split of a file: sha1 of its base name, modulo 5."""
    return int(hashlib.sha1(Path(name).name.encode()).hexdigest(), 16) % 5


def parse_utkface_name(path: Path) -> LabelledImage | None:
    """`AGE_GENDER_RACE_DATE.jpg.chip.jpg` → labels; None for names missing a field."""
    parts = path.name.split("_")
    if len(parts) < 4 or parse_age(parts[0]) is None or parts[1] not in ("0", "1"):
        return None
    return LabelledImage(
        path=path,
        age=int(parts[0]),
        is_male=parts[1] == "0",
        source="utkface",
        ethnicity=utkface_ethnicity(path.name),
    )


def _row_image(directory: Path, row: dict[str | None, str | None], where: str) -> LabelledImage:
    """The labelled image of one labels.csv row; `where` is its FILE:LINE."""
    file, age_text, gender = (row.get(column) for column in LABEL_COLUMNS)
    if file is None or age_text is None or gender is None:
        raise ValueError(f"{where}: expected 3 fields, {','.join(LABEL_COLUMNS)}")
    file, age, gender = file.strip(), parse_age(age_text.strip()), gender.strip().lower()
    if not file:
        raise ValueError(f"{where}: the file name is empty")
    if age is None:
        raise ValueError(
            f"{where}: age must be whole years from 0 to {MAX_AGE} in digits 0-9, got {age_text!r}"
        )
    if gender not in GENDERS:
        raise ValueError(f"{where}: gender must be male or female (m, f, 0, 1), got {gender!r}")
    relative = Path(file)
    source = relative.parts[0] if len(relative.parts) > 1 else directory.name
    ethnicity = utkface_ethnicity(relative.name) if source == "utkface" else ""
    return LabelledImage(directory / relative, age, GENDERS[gender], source, ethnicity)


def _labels_text(labels: Path) -> str:
    data = labels.read_bytes()
    try:
        return data.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{labels}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); save it as CSV UTF-8"
        ) from None


def _from_labels_file(directory: Path) -> list[LabelledImage]:
    """The rows of the folder's labels.csv; the first bad row ends it, named by FILE:LINE."""
    labels = directory / LABELS_FILE
    reader = csv.DictReader(io.StringIO(_labels_text(labels), newline=""))
    try:
        header = reader.fieldnames or []
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise ValueError(f"{labels}:{reader.line_num}: not CSV ({error})") from None
    if not set(LABEL_COLUMNS) <= set(header):
        raise ValueError(
            f"{labels}:1: expected the columns {','.join(LABEL_COLUMNS)}, got {','.join(header)!r}"
        )
    images: list[LabelledImage] = []
    first_line: dict[Path, int] = {}
    for line, row in rows:
        image = _row_image(directory, row, f"{labels}:{line}")
        if image.path in first_line:
            raise ValueError(
                f"{labels}:{line}: {image.path.relative_to(directory)} is labelled again (first "
                f"on line {first_line[image.path]}); keep one row per image"
            )
        first_line[image.path] = line
        images.append(image)
    return images


def _from_utkface_names(directory: Path) -> list[LabelledImage]:
    images = []
    for path in sorted(directory.glob("*.jpg")):
        labelled = parse_utkface_name(path)
        if labelled is None:
            log.warning("skipping %s: not an AGE_GENDER_RACE_DATE UTKFace name", path.name)
            continue
        images.append(labelled)
    return images


def load_labelled(directory: Path, limit: int | None = None) -> list[LabelledImage]:
    """The folder's labelled images: from its labels.csv (`file,age,gender`) when it has one,
    else from UTKFace file names. `limit` keeps that many, spread evenly over the sorted list
    so that the age mix stays close to the whole set's."""
    if not directory.is_dir():
        raise FileNotFoundError(f"evaluation folder not found: {directory}")
    if (directory / LABELS_FILE).is_file():
        images = _from_labels_file(directory)
    else:
        images = _from_utkface_names(directory)
    if not images:
        raise FileNotFoundError(
            f"no labelled images in {directory}: add a {LABELS_FILE} (file,age,gender) "
            "or use UTKFace AGE_GENDER_RACE_DATE names"
        )
    if limit is not None and limit < len(images):
        images = [images[i] for i in np.linspace(0, len(images) - 1, limit).round().astype(int)]
    return images


def central_face(faces: Faces, canvas_shape: tuple[int, ...]) -> int | None:
    """Index of the detection nearest the canvas centre, where a padded crop's face is."""
    if len(faces) == 0:
        return None
    centre = np.array(canvas_shape[1::-1], float) / 2
    box_centres = (faces.xyxy[:, :2] + faces.xyxy[:, 2:]) / 2
    return int(np.argmin(np.linalg.norm(box_centres - centre, axis=1)))


def detect_on_canvas(detector: Detector, image_rgb: np.ndarray) -> tuple[np.ndarray, Faces]:
    """A face crop padded onto a canvas (BlazeFace misses faces that fill the frame), and the
    one face the pipeline finds there (empty when it finds none)."""
    canvas, _ = pad_to_canvas(image_rgb)
    faces = detector.detect(canvas)
    best = central_face(faces, canvas.shape)
    return canvas, Faces.empty() if best is None else faces[best : best + 1]
