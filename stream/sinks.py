"""Outputs of a run: window, annotated video file, JSON lines. Each is a context manager
so that whatever was written is finalized on normal end, on errors and on Ctrl-C."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from stream.smoothing import TrackSummary
from stream.types import FrameResult

log = logging.getLogger(__name__)

QUIT_KEYS = (ord("q"), 27)  # q and Esc


class SinkError(RuntimeError):
    """An output cannot be written; the message names it and what to do."""


def _parent_must_exist(path: Path, what: str) -> None:
    if not path.parent.is_dir():
        raise SinkError(f"cannot write {what} {path}: folder {path.parent} does not exist")


class VideoFileSink:
    """Writes annotated frames at the source's size and frame rate."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float) -> None:
        self.path = Path(path)
        _parent_must_exist(self.path, "video")
        fourcc = cv2.VideoWriter_fourcc(*"mp4v")
        self._writer = cv2.VideoWriter(str(self.path), fourcc, fps, (width, height))
        if not self._writer.isOpened():
            raise SinkError(f"cannot open video writer for {self.path}; use a .mp4 file name")
        self._size = (width, height)
        self.frames_written = 0

    def write(self, image: np.ndarray) -> None:
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size)
        self._writer.write(image)
        self.frames_written += 1

    def close(self) -> None:
        self._writer.release()

    def __enter__(self) -> VideoFileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _number(value: float, digits: int) -> float | None:
    """JSON has no NaN or infinity: values not known are null."""
    return round(float(value), digits) if math.isfinite(value) else None


def frame_record(result: FrameResult) -> dict:
    """The JSON-lines record of one frame: smoothed values where tracking ran, with the
    frame's raw estimate beside them (null where the face was not estimated this frame)."""
    raw, smoothed = result.estimates, result.smoothed
    faces = []
    for i, (box, score) in enumerate(zip(result.faces.xyxy, result.faces.score)):
        if smoothed is None:
            age, p_male, is_male = raw.age[i], raw.p_male[i], raw.p_male[i] >= 0.5
        else:
            age, p_male, is_male = smoothed.age[i], smoothed.p_male[i], smoothed.is_male[i]
        face = {
            "box": [round(float(v), 1) for v in box],
            "score": round(float(score), 4),
            "age": _number(age, 2),
            # Age-only estimators predict no gender: p_male is NaN, gender null.
            "gender": None if math.isnan(p_male) else ("male" if is_male else "female"),
            "p_male": _number(p_male, 4),
            "track": None if result.track_ids is None else int(result.track_ids[i]),
        }
        if smoothed is not None:
            face["age_uncertainty"] = _number(smoothed.age_uncertainty[i], 2)
            face["age_raw"] = _number(raw.age[i], 2)
            face["p_male_raw"] = _number(raw.p_male[i], 4)
        faces.append(face)
    return {"frame": result.frame.index, "t_ms": round(result.t_ms, 3), "faces": faces}


class JsonLinesSink:
    """One JSON record per frame; each line is flushed so a killed run leaves whole lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _parent_must_exist(self.path, "JSON lines file")
        self._file: IO[str] = self.path.open("w", encoding="utf-8")
        self.lines_written = 0

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        self.lines_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonLinesSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TRACK_CSV_COLUMNS = [f.name for f in dataclasses.fields(TrackSummary)]


class TrackCsvSink:
    """One row per track, written when the track ends; flushed so a killed run keeps rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _parent_must_exist(self.path, "tracks CSV")
        self._file: IO[str] = self.path.open("w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=TRACK_CSV_COLUMNS)
        self._writer.writeheader()
        self.rows_written = 0

    def write_all(self, summaries: list[TrackSummary]) -> None:
        for summary in summaries:
            row = dataclasses.asdict(summary)
            for name, digits in (
                ("first_t_ms", 1),
                ("last_t_ms", 1),
                ("age", 2),
                ("age_uncertainty", 2),
                ("p_male", 4),
                ("mean_quality", 4),
            ):
                row[name] = "" if not math.isfinite(row[name]) else round(row[name], digits)
            self._writer.writerow(row)
            self.rows_written += 1
        if summaries:
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TrackCsvSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WindowSink:
    """A cv2 window; `show` returns False once the user presses q or Esc or closes it."""

    def __init__(self, title: str) -> None:
        self.title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as error:
            raise SinkError(
                f"cannot open a window ({str(error).strip().splitlines()[-1]}); "
                "run with --no-window on a machine without a display"
            ) from error

    def show(self, image: np.ndarray) -> bool:
        cv2.imshow(self.title, image)
        key = cv2.waitKey(1) & 0xFF
        if key in QUIT_KEYS:
            return False
        return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        cv2.destroyWindow(self.title)
        cv2.waitKey(1)

    def __enter__(self) -> WindowSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
