"""Clips made from the shared ones for label and track tests: several people at once (a grid
of clips), a person who leaves and comes back, and footage with no face in it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detectors import create_detector
from stream.config import DetectorConfig

FPS = 30.0


def _frames(path: Path, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image if size is None else cv2.resize(image, size))
    capture.release()
    return frames


def _write(path: Path, frames: list[np.ndarray]) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (width, height))
    for image in frames:
        writer.write(image)
    writer.release()
    return path


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` scaled to fit `size` (w, h) without distortion, centred on black."""
    width, height = size
    scale = min(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    cell = np.zeros((height, width, 3), np.uint8)
    top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    cell[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return cell


def grid_clip(paths: list[Path], out: Path, cell: tuple[int, int] = (640, 360)) -> Path:
    """The clips side by side, two per row, each fitted into `cell`, as long as the shortest."""
    clips = [_frames(path) for path in paths]
    length = min(len(frames) for frames in clips)
    blank = np.zeros((cell[1], cell[0], 3), np.uint8)
    frames = []
    for i in range(length):
        cells = [_fit(frames[i], cell) for frames in clips]
        if len(cells) % 2:
            cells.append(blank)
        rows = [np.hstack(cells[j : j + 2]) for j in range(0, len(cells), 2)]
        frames.append(np.vstack(rows))
    return _write(out, frames)


def leave_and_return_clip(path: Path, out: Path, away_s: float = 3.0) -> Path:
    """The clip, `away_s` of black (longer than a track lives unseen), then the clip again:
    one person who leaves and comes back."""
    frames = _frames(path)
    away = [np.zeros_like(frames[0])] * round(away_s * FPS)
    return _write(out, frames + away + frames)


def no_face_clip(paths: list[Path], out: Path, side: int = 224, per_clip: int = 8) -> Path:
    """From each clip, up to `per_clip` `side`-pixel squares that keep clear of every face
    BlazeFace finds in it (full-range, low threshold, boxes grown by their own size), each
    over the frames where it is clear: real footage (hands, hair, clothes, rooms, crowds out
    of focus) with no face, one square after another."""
    frames_out = []
    settings = DetectorConfig(model="full", min_confidence=0.3, min_face_px=0)
    for path in paths:
        frames = _frames(path)
        height, width = frames[0].shape[:2]
        with create_detector(settings, width) as detector:
            boxes = [detector.detect(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)).xyxy for f in frames]
        for x, y in _clear_windows(boxes, width, height, side, per_clip):
            for image, found in zip(frames, boxes):
                if not any(_near((x, y, x + side, y + side), box) for box in found):
                    frames_out.append(image[y : y + side, x : x + side])
    return _write(out, frames_out)


def _near(window: tuple[int, int, int, int], box: np.ndarray) -> bool:
    """Whether the box, grown by its own size on every side, touches the window."""
    x1, y1, x2, y2 = box
    grow_x, grow_y = x2 - x1, y2 - y1
    return not (
        x2 + grow_x < window[0]
        or x1 - grow_x > window[2]
        or y2 + grow_y < window[1]
        or y1 - grow_y > window[3]
    )


def _clear_windows(
    boxes: list[np.ndarray], width: int, height: int, side: int, count: int
) -> list[tuple[int, int]]:
    """Top left corners of up to `count` windows that do not overlap one another, on a
    coarse grid, clear of faces in the most frames (and in at least a second's worth)."""
    clear_frames = {}
    for x in range(0, width - side + 1, side // 4):
        for y in range(0, height - side + 1, side // 4):
            window = (x, y, x + side, y + side)
            clear = [not any(_near(window, box) for box in found) for found in boxes]
            clear_frames[x, y] = sum(clear)
    chosen: list[tuple[int, int]] = []
    for (x, y), clear in sorted(clear_frames.items(), key=lambda item: -item[1]):
        apart = all(abs(x - cx) >= side or abs(y - cy) >= side for cx, cy in chosen)
        if clear >= FPS and apart and len(chosen) < count:
            chosen.append((x, y))
    return chosen
