"""Outputs of a run: window, annotated video file, JSON lines. Each is a context manager
so that whatever was written is finalized on normal end, on errors and on Ctrl-C."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO

import cv2
import numpy as np

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


def frame_record(result: FrameResult, t_ms: float) -> dict:
    """The JSON-lines record of one frame."""
    faces = []
    tracks = result.track_ids
    for i, (box, score) in enumerate(zip(result.faces.xyxy, result.faces.score)):
        p_male = float(result.estimates.p_male[i])
        faces.append(
            {
                "box": [round(float(v), 1) for v in box],
                "score": round(float(score), 4),
                "age": round(float(result.estimates.age[i]), 2),
                "gender": "male" if p_male >= 0.5 else "female",
                "p_male": round(p_male, 4),
                "track": None if tracks is None else int(tracks[i]),
            }
        )
    return {"frame": result.frame.index, "t_ms": round(t_ms, 3), "faces": faces}


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
