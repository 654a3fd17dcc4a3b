"""Measure the gender label rule (stream.smoothing.GenderRule) on labelled development faces.

Each face goes through the whole pipeline as a one-view track (as `agestream evaluate` does);
for each candidate margin it reports how many adult faces get a male/female label and how many
of those labels are right, and the same for children (ages under 10). Only development folders
(split 0): never the reserved split. Example:

    python tools/calibrate_labels.py ../shared/data/utkface-dev ../shared/data/faces/dev
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contextlib import ExitStack  # noqa: E402

from estimators import create_estimator  # noqa: E402
from stream.config import load_config  # noqa: E402
from stream.faceset import load_labelled  # noqa: E402
from stream.photos import DetectorsByModel, PhotoLabeller  # noqa: E402
from stream.reports.evaluate import pipeline_predictor  # noqa: E402
from stream.stages import face_checker  # noqa: E402

MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4)
MIN_AGE = 10


def rows(true_age, is_male, age, p_male) -> list[str]:
    """One line per margin: labelled share and accuracy, adults (estimated age >= MIN_AGE)
    and children (true age < MIN_AGE, whatever the estimate)."""
    lines = []
    for margin in MARGINS:
        decided = np.abs(p_male - 0.5) >= margin
        cells = []
        for name, group in (("adults", age >= MIN_AGE), ("children", true_age < MIN_AGE)):
            labelled = group & decided
            right = ((p_male >= 0.5) == is_male)[labelled]
            accuracy = right.mean() if right.size else float("nan")
            cells.append(
                f"{name} {labelled.sum() / group.sum():6.1%} labelled, {accuracy:6.1%} right"
            )
        lines.append(f"margin {margin:.1f}: " + "; ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", type=Path, nargs="+")
    parser.add_argument("--limit", type=int, help="images per folder, spread over it")
    args = parser.parse_args()
    config = load_config(None)
    images = [image for d in args.directories for image in load_labelled(d, args.limit)]
    with ExitStack() as stack:
        detectors = DetectorsByModel(config.detector, config.models_dir, stack)
        estimator = create_estimator(config.estimator)
        labeller = PhotoLabeller(detectors, estimator, face_checker(config, stack), config.tracking)
        age, p_male, _, _ = pipeline_predictor(labeller)(images)
    found = np.isfinite(p_male)
    true_age = np.array([image.age for image in images])[found]
    is_male = np.array([image.is_male for image in images])[found]
    print(f"{found.sum()} of {len(images)} faces found ({config.estimator.name})")
    print("\n".join(rows(true_age, is_male, age[found], p_male[found])))


if __name__ == "__main__":
    main()
