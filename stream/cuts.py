"""Shot changes: a frame whose coarse colour layout differs from the previous frame's; and the
colours of each face box, whose sudden change says another face may have taken its place.

A hard cut in an edited video, or a camera that is moved, changes the colours of most of
the picture at once; camera motion, a person moving and lighting changes change few
regions, or change them a little. Tracks must not continue across a cut: the face at the
same place after it is usually someone else (tracking.cut_threshold in config.yaml).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

# The frame is cut into GRID x GRID regions, each summarized by a hue-saturation and a value
# histogram; a cut must change most regions (the median region), so one person walking
# close to the camera is not a cut.
GRID = 3
HUE_BINS, SATURATION_BINS, VALUE_BINS = 8, 4, 4
# Frames and face boxes are sampled to about this many pixels a side.
SAMPLE_SIDE, FACE_SAMPLE_SIDE = 64, 24


# Bin of each 8-bit hue (OpenCV's 0-179) times SATURATION_BINS, of each saturation, and of
# each value, as lookup tables: OpenCV's LUT and calcHist on 8-bit images cost a fraction of
# per-pixel NumPy arithmetic.
_HUE_LUT = (np.arange(256) * HUE_BINS // 180 * SATURATION_BINS).astype(np.uint8)
_SATURATION_LUT = (np.arange(256) * SATURATION_BINS // 256).astype(np.uint8)
_VALUE_LUT = (np.arange(256) * VALUE_BINS // 256).astype(np.uint8)
_HS_COUNT = HUE_BINS * SATURATION_BINS


def _histograms(image_bgr: np.ndarray, regions: np.ndarray, count: int) -> np.ndarray:
    """(count, bins) float32: per region label of `regions` (uint8, one per pixel), the square
    root of its normalized hue-saturation (weight 0.8) and value (weight 0.2) histograms, so
    that a row's dot product with another's is their Bhattacharyya coefficient (1: the same
    colours)."""
    hue, saturation, value = cv2.split(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV))
    hs_bin = cv2.add(cv2.LUT(hue, _HUE_LUT), cv2.LUT(saturation, _SATURATION_LUT))
    value_bin = cv2.LUT(value, _VALUE_LUT)
    ranges = [0, count, 0, _HS_COUNT]
    hs = cv2.calcHist([regions, hs_bin], [0, 1], None, [count, _HS_COUNT], ranges)
    v = cv2.calcHist([regions, value_bin], [0, 1], None, [count, VALUE_BINS], ranges[:3] + [4])
    counts = np.maximum(hs.sum(axis=1, keepdims=True), 1)
    # Brightness says least of the three: it changes with the light.
    histogram = np.concatenate([0.8 * hs / counts, 0.2 * v / counts], axis=1)
    return np.sqrt(histogram).astype(np.float32)


def _sampled(image_bgr: np.ndarray, side: int) -> np.ndarray:
    """The image shrunk to at most about `side` pixels a side by taking every k-th pixel: a
    histogram needs no detail."""
    step = max(1, max(image_bgr.shape[:2]) // side)
    if step == 1:
        return np.ascontiguousarray(image_bgr)
    # At least one pixel each way: a sliver of a box at the frame's edge is 2 px thin.
    size = (max(1, image_bgr.shape[1] // step), max(1, image_bgr.shape[0] // step))
    return cv2.resize(image_bgr, size, interpolation=cv2.INTER_NEAREST)


@functools.cache
def _grid(rows: int, cols: int) -> np.ndarray:
    """(rows, cols) uint8 region label of each pixel of a GRID x GRID split."""
    labels = (np.arange(rows) * GRID // rows)[:, None] * GRID + np.arange(cols) * GRID // cols
    return labels.astype(np.uint8)


def scene_signature(image_bgr: np.ndarray) -> np.ndarray:
    """(GRID * GRID, bins) float32: the colour histograms (see `_histograms`) of the frame's
    GRID x GRID regions."""
    small = _sampled(image_bgr, SAMPLE_SIDE)
    return _histograms(small, _grid(*small.shape[:2]), GRID * GRID)


HISTOGRAM_BINS = HUE_BINS * SATURATION_BINS + VALUE_BINS


def patch_histogram(patch_bgr: np.ndarray, side: int) -> np.ndarray:
    """(HISTOGRAM_BINS,) float32: the colour histogram (see `_histograms`) of one image patch,
    sampled to about `side` pixels a side."""
    small = _sampled(patch_bgr, side)
    return _histograms(small, np.zeros(small.shape[:2], np.uint8), 1)[0]


def face_looks(image_bgr: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    """(n, bins) float32: the colour histogram of each face box (zeros for a box outside the
    frame). From one frame to the next a face's changes by at most 0.024 (one minus the
    coefficient) on the shared clips; another face put in its place changes it by ~0.1."""
    height, width = image_bgr.shape[:2]
    looks = np.zeros((len(xyxy), HISTOGRAM_BINS), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.round(np.asarray(xyxy, np.float64)).astype(int)):
        patch = image_bgr[max(y1, 0) : min(y2, height), max(x1, 0) : min(x2, width)]
        if patch.shape[0] >= 2 and patch.shape[1] >= 2:
            looks[i] = patch_histogram(patch, FACE_SAMPLE_SIDE)
    return looks


def scene_change(previous: np.ndarray, current: np.ndarray) -> float:
    """0 (same colour layout) to 1: one minus the median region's Bhattacharyya coefficient."""
    return float(1.0 - np.median(np.sum(previous * current, axis=1)))


class CutDetector:
    """Says which frames start a new shot.

    Args:
        threshold: least `scene_change` from the previous frame that counts as a cut; 0 turns
            detection off. On the shared clips hard cuts score 0.15-0.19 and everything else
            at most 0.018; whip pans of 100 px a frame, zooms, halving or a 70 % drop of the
            light and focus pulls at most 0.042 (tests/test_identity.py checks both).
    """

    def __init__(self, threshold: float) -> None:
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), but got {threshold}")
        self.threshold = threshold
        self._previous: np.ndarray | None = None

    def update(self, signature: np.ndarray) -> bool:
        """Whether the frame of `signature` (from `scene_signature`) starts a new shot. The
        first frame does not: nothing came before it."""
        previous, self._previous = self._previous, signature
        if self.threshold == 0 or previous is None:
            return False
        return scene_change(previous, signature) >= self.threshold
