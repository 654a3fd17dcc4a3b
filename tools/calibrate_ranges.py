"""Fit genderage's 80 % age-range scales (estimators.onnx_genderage.AGE_RANGE_SCALES) on
labelled development faces, through the whole still-image pipeline (as `agestream evaluate`).

The ranges are first taken raw (every scale 1: the model's own 10th-90th percentiles); then,
per band of the estimated age, the scale that makes 80 % of that band's ranges hold the true
age is the 80th percentile of the scale each face needs. Only development folders (split 0):
never the reserved split. Example:

    python tools/calibrate_ranges.py ../shared/data/utkface-dev ../shared/data/faces/dev
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import estimators.onnx_genderage as genderage  # noqa: E402
from stream.cli import main as agestream  # noqa: E402

TARGET = 0.8


def raw_ranges(folders: list[str], extra: list[str]) -> list[dict]:
    """Per-image records of `agestream evaluate` with unscaled ranges."""
    genderage.AGE_RANGE_SCALES = (1.0,) * len(genderage.AGE_RANGE_SCALES)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        if agestream(["evaluate", *folders, *extra, "--json", str(report)]) != 0:
            raise SystemExit("evaluate failed")
        rows = json.loads(report.read_text())["per_image"]
    return [row for row in rows if row["age"] is not None and row["age_low"] is not None]


def needed_scale(rows: list[dict]) -> np.ndarray:
    """Per face, the smallest scale about its estimate whose range holds its true age."""
    age, truth = (np.array([row[key] for row in rows], float) for key in ("age", "true_age"))
    low, high = (np.array([row[key] for row in rows], float) for key in ("age_low", "age_high"))
    below = (age - truth) / np.maximum(age - low, 1e-6)
    above = (truth - age) / np.maximum(high - age, 1e-6)
    return np.maximum(np.where(truth < age, below, above), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--config", help="agestream config (e.g. genderage's flip off)")
    args = parser.parse_args()
    rows = raw_ranges(args.folders, ["--config", args.config] if args.config else [])
    age = np.array([row["age"] for row in rows], float)
    scales = needed_scale(rows)
    band = np.searchsorted(genderage.AGE_RANGE_BAND_EDGES, age, side="right")
    edges = (0.0, *genderage.AGE_RANGE_BAND_EDGES, None)
    fitted = []
    for index in range(len(edges) - 1):
        chosen = scales[band == index]
        scale = float(np.quantile(chosen, TARGET)) if len(chosen) else 1.0
        fitted.append(round(scale, 2))
        raw = float(np.mean(chosen <= 1.0)) if len(chosen) else float("nan")
        print(f"estimated {edges[index]}-{edges[index + 1] or ''}: {len(chosen)} faces, "
              f"raw 10-90 % range holds {raw:.1%}, scale {scale:.2f}")  # fmt: skip
    print(f"AGE_RANGE_SCALES = {tuple(fitted)}")


if __name__ == "__main__":
    main()
