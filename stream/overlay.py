"""Draw boxes, age/gender labels and a HUD of measured rates onto a frame."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from stream.types import FrameResult

FEMALE_COLOUR = (180, 105, 255)  # BGR pink
MALE_COLOUR = (255, 160, 60)  # BGR blue
HUD_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class HudStats:
    processing_fps: float
    source_fps: float
    dropped: int


def face_label(age: float, p_male: float) -> tuple[str, float]:
    """`("F 34", confidence)`, the confidence being that of the gender call."""
    is_male = p_male >= 0.5
    return f"{'M' if is_male else 'F'} {age:.0f}", p_male if is_male else 1.0 - p_male


def _text_with_background(
    image: np.ndarray,
    text: str,
    origin: tuple[int, int],
    colour: tuple[int, int, int],
    scale: float,
) -> None:
    thickness = max(1, round(scale * 2))
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = origin
    y = max(y, height + baseline)
    cv2.rectangle(image, (x, y - height - baseline), (x + width, y + baseline), (0, 0, 0), -1)
    cv2.putText(
        image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA
    )


def annotate(result: FrameResult, stats: HudStats) -> np.ndarray:
    """Return a copy of the frame with faces labelled and the HUD drawn."""
    image = result.frame.image.copy()
    scale = max(0.4, image.shape[0] / 900)
    for box, age, p_male in zip(result.faces.xyxy, result.estimates.age, result.estimates.p_male):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        label, confidence = face_label(float(age), float(p_male))
        colour = MALE_COLOUR if p_male >= 0.5 else FEMALE_COLOUR
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, max(1, round(scale * 2)))
        _text_with_background(image, f"{label} ({confidence:.0%})", (x1, y1 - 4), colour, scale)
    hud = (
        f"{stats.processing_fps:.1f} FPS processed | source {stats.source_fps:.1f} FPS"
        f" | dropped {stats.dropped}"
    )
    _text_with_background(image, hud, (6, 6), HUD_COLOUR, scale * 0.9)
    return image
