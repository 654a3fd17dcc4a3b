"""Draw boxes, age/gender labels and a HUD of measured rates onto a frame, sized to stay
readable wherever the frame is shown."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from stream.types import FrameResult

FEMALE_COLOUR = (180, 105, 255)  # BGR pink
MALE_COLOUR = (255, 160, 60)  # BGR blue
HUD_COLOUR = (255, 255, 255)
NO_GENDER_COLOUR = (200, 200, 200)  # age-only estimators
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Cap height in pixels per unit of font scale (OpenCV's built-in font, measured).
CAP_PX_PER_SCALE = 20.0
# Labels are at least this tall on screen (readable on a laptop)...
MIN_CAP_PX = 16.0
# ... and otherwise this fraction of the frame's shorter side, so they grow with the frame.
CAP_PER_SHORT_SIDE = 0.025
HUD_SCALE = 0.9  # the HUD is second to the labels


@dataclass(frozen=True)
class HudStats:
    processing_fps: float
    source_fps: float
    dropped: int


def face_label(
    age: float, p_male: float, is_male: bool, uncertainty: float = math.inf
) -> tuple[str, float | None]:
    """`("F 34±2", confidence)`; the confidence is that of the gender call, the ± the age's
    standard error once a track has more than one estimate. What an estimator does not
    predict (NaN) is left out."""
    parts = []
    if not math.isnan(p_male):
        parts.append("M" if is_male else "F")
    if not math.isnan(age):
        parts.append(
            f"{age:.0f}" + (f"±{max(uncertainty, 1.0):.0f}" if math.isfinite(uncertainty) else "")
        )
    confidence = None if math.isnan(p_male) else (p_male if is_male else 1.0 - p_male)
    return " ".join(parts), confidence


def font_scale(width: int, height: int, shown: float = 1.0) -> float:
    """The labels' font scale for a frame shown at `shown` times its size (a window shrunk to
    fit the screen): a cap height proportional to the frame, never under MIN_CAP_PX on screen.
    """
    cap_px = max(MIN_CAP_PX / shown, min(width, height) * CAP_PER_SHORT_SIDE)
    return cap_px / CAP_PX_PER_SCALE


def _text_with_background(
    image: np.ndarray,
    text: str,
    origin: tuple[int, int],
    colour: tuple[int, int, int],
    scale: float,
) -> None:
    thickness = max(1, round(scale * 2))
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = origin
    y = max(y, height + baseline)
    cv2.rectangle(image, (x, y - height - baseline), (x + width, y + baseline), (0, 0, 0), -1)
    cv2.putText(image, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def hud_line(image: np.ndarray, text: str, row: int, scale: float) -> None:
    """Write `text` as the HUD's `row`-th line (0: the rates) in the top left corner."""
    hud_scale = scale * HUD_SCALE
    (_, height), baseline = cv2.getTextSize("Hg", FONT, hud_scale, max(1, round(hud_scale * 2)))
    top = row * (height + 2 * baseline + max(2, round(height / 4)))
    _text_with_background(image, text, (6, top + height + baseline), HUD_COLOUR, hud_scale)


def annotate(result: FrameResult, stats: HudStats | None, scale: float | None = None) -> np.ndarray:
    """Label the faces and draw the HUD (none when `stats` is None: a still image) onto the
    frame's own image, and return it.

    `scale` is the font scale (default: `font_scale` for the frame shown at its own size).
    In place because nothing reads the raw image after annotation, and a copy of every
    frame costs the busiest thread about a millisecond at 720p.
    """
    image = result.frame.image
    if scale is None:
        scale = font_scale(image.shape[1], image.shape[0])
    smoothed = result.smoothed
    for i, box in enumerate(result.faces.xyxy):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        if smoothed is None:
            p_male = float(result.estimates.p_male[i])
            label, confidence = face_label(float(result.estimates.age[i]), p_male, p_male >= 0.5)
            is_male = p_male >= 0.5
        else:
            is_male = bool(smoothed.is_male[i])
            label, confidence = face_label(
                float(smoothed.age[i]),
                float(smoothed.p_male[i]),
                is_male,
                float(smoothed.age_uncertainty[i]),
            )
        if result.track_ids is not None:
            label = f"#{result.track_ids[i]} {label}"
        colour = (
            NO_GENDER_COLOUR if confidence is None else (MALE_COLOUR if is_male else FEMALE_COLOUR)
        )
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, max(1, round(scale * 2)))
        if confidence is not None:
            label += f" ({confidence:.0%})"
        _text_with_background(image, label, (x1, y1 - 4), colour, scale)
    if stats is not None:
        hud = (
            f"{stats.processing_fps:.1f} FPS processed | source {stats.source_fps:.1f} FPS"
            f" | dropped {stats.dropped}"
        )
        hud_line(image, hud, 0, scale)
    return image
