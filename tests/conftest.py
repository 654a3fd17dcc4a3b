"""Shared test data lives beside the checkout in ../shared (CI has it there too)."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIDEOS = SHARED / "data" / "videos"
UTKFACE = SHARED / "data" / "utkface-dev"
HAMILTON = VIDEOS / "face_recognition__short_hamilton_clip.mp4"


def decoded_frame_count(path: Path) -> int:
    """Frames a video actually decodes to (container counts can be approximate)."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def require(path: Path) -> Path:
    """Skip the calling test, saying why, when shared data is missing."""
    if not path.exists():
        pytest.skip(f"needs shared test data at {path} (../shared beside the checkout)")
    return path
