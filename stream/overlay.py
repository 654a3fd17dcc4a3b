"""Draw boxes, age/gender labels and a HUD of measured rates onto a frame, sized to stay
readable wherever the frame is shown."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from stream.records import face_label_state, gender_confidence, shown_age_range
from stream.types import Faces, FrameResult

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


@dataclass(frozen=True)
class Drawing:
    """How a stream's frames are drawn: label font `scale`; `hud`: the rates line on top;
    `blur`: every detected face blurred (labels stay), in everything written or served."""

    scale: float
    hud: bool = True
    blur: bool = False


# A face is blurred with a box filter this fraction of its box's larger side wide, twice:
# features are gone (a 64 px face becomes a smooth blob) whatever the face's size.
BLUR_FRACTION = 0.25
# The blurred area reaches this fraction of the box beyond it on each side: BlazeFace's box
# ends at the hairline and chin.
BLUR_MARGIN = 0.2


def blur_faces(image: np.ndarray, faces: Faces) -> np.ndarray:
    """Blur each face of `faces` (all of them: confirmed or not) in `image`, in place."""
    height, width = image.shape[:2]
    for x1, y1, x2, y2 in faces.xyxy:
        margin_x, margin_y = (x2 - x1) * BLUR_MARGIN, (y2 - y1) * BLUR_MARGIN
        left, top = max(0, int(x1 - margin_x)), max(0, int(y1 - margin_y))
        right, bottom = min(width, int(x2 + margin_x) + 1), min(height, int(y2 + margin_y) + 1)
        if right - left < 2 or bottom - top < 2:
            continue
        region = image[top:bottom, left:right]
        kernel = max(3, int(max(right - left, bottom - top) * BLUR_FRACTION) | 1)
        for _ in range(2):
            region[:] = cv2.blur(region, (kernel, kernel))
    return image


def age_text(age: float, age_range: tuple[float, float] = (math.nan, math.nan)) -> str:
    """The age as people read it: its 80 % range, "38-52", when there is one (a lone "±2"
    read as "right to 2 years"), else the age alone; "" for no age."""
    low, high = age_range
    if math.isfinite(low) and math.isfinite(high):
        return f"{low:.0f}-{high:.0f}"
    return "" if math.isnan(age) else f"{age:.0f}"


def face_label(
    age: float,
    p_male: float,
    gender: str | None,
    age_range: tuple[float, float] = (math.nan, math.nan),
) -> str:
    """`"F 38-52 (90%)"`: the gender call and its confidence, and the age's 80 % range (the
    age alone from an estimator without one). An unsure gender is "?" without a percentage;
    what an estimator does not predict (NaN, None) is left out."""
    parts = []
    if gender == "unsure":
        parts.append("?")
    elif gender is not None:
        parts.append("M" if gender == "male" else "F")
    if age_text(age, age_range):
        parts.append(age_text(age, age_range))
    confidence = gender_confidence(gender, p_male)
    if confidence is not None:
        parts.append(f"({confidence:.0%})")
    return " ".join(parts)


def font_scale(width: int, height: int, shown: float = 1.0) -> float:
    """The labels' font scale for a frame shown at `shown` times its size (a window shrunk to
    fit the screen): a cap height proportional to the frame, never under MIN_CAP_PX on screen.
    """
    cap_px = max(MIN_CAP_PX / shown, min(width, height) * CAP_PER_SHORT_SIDE)
    return cap_px / CAP_PX_PER_SCALE


def _text_size(text: str, scale: float) -> tuple[int, int, int]:
    """Width, height above the baseline and depth below it of `text` in the label font."""
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, max(1, round(scale * 2)))
    return width, height, baseline


def _draw_text(
    image: np.ndarray, text: str, top_left: tuple[int, int], colour: tuple, scale: float
) -> None:
    """`text` on a black background whose top left corner is `top_left`."""
    width, height, baseline = _text_size(text, scale)
    x, y = top_left
    cv2.rectangle(image, (x, y), (x + width, y + height + 2 * baseline), (0, 0, 0), -1)
    cv2.putText(
        image, text, (x, y + height + baseline), FONT, scale, colour,
        max(1, round(scale * 2)), cv2.LINE_AA,
    )  # fmt: skip


def hud_line(image: np.ndarray, text: str, row: int, scale: float) -> Box:
    """Write `text` as the HUD's `row`-th line (0: the rates) in the top left corner; returns
    the area it covers."""
    hud_scale = scale * HUD_SCALE
    _, height, baseline = _text_size("Hg", hud_scale)
    width = _text_size(text, hud_scale)[0]
    top = row * (height + 2 * baseline + max(2, round(height / 4)))
    _draw_text(image, text, (6, top), HUD_COLOUR, hud_scale)
    return (6, top, 6 + width, top + height + 2 * baseline)


Box = tuple[int, int, int, int]


def _overlap(a: Box, b: Box) -> int:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


def place_label(size: tuple[int, int], face: Box, frame: tuple[int, int], taken: list[Box]) -> Box:
    """Where a label of `size` (w, h) goes for the `face` box: above it, else below it, else
    inside its top; always inside the `frame` (w, h), and at the first of those places that
    covers none of the `taken` areas (other faces' boxes and labels, the HUD), else at the one
    that covers least of them."""
    width, height = size
    x1, y1, x2, y2 = face
    left = min(max(x1, 0), max(frame[0] - width, 0))
    candidates = []
    for top in (y1 - height - 2, y2 + 2, y1 + 2):
        top = min(max(top, 0), max(frame[1] - height, 0))
        candidates.append((left, top, left + width, top + height))
    covered = [sum(_overlap(c, other) for other in taken) for c in candidates]
    return candidates[covered.index(min(covered))]


def _face_colour(gender: str | None) -> tuple[int, int, int]:
    if gender == "male":
        return MALE_COLOUR
    return FEMALE_COLOUR if gender == "female" else NO_GENDER_COLOUR


def annotate(result: FrameResult, stats: HudStats | None, scale: float | None = None) -> np.ndarray:
    """Box and label the shown faces (those of confirmed tracks) and draw the HUD (none when
    `stats` is None: a still image) onto the frame's own image, and return it.

    `scale` is the font scale (default: `font_scale` for the frame shown at its own size).
    In place because nothing reads the raw image after annotation, and a copy of every
    frame costs the busiest thread about a millisecond at 720p.
    """
    image = result.frame.image
    if scale is None:
        scale = font_scale(image.shape[1], image.shape[0])
    taken: list[Box] = []
    if stats is not None:
        hud = (
            f"{stats.processing_fps:.1f} FPS processed | source {stats.source_fps:.1f} FPS"
            f" | dropped {stats.dropped}"
        )
        rates = hud_line(image, hud, 0, scale)
        # The HUD's band: the rates, and below them the window's key help or "paused" line,
        # drawn over the frame later.
        taken.append((0, 0, image.shape[1], rates[3] + (rates[3] - rates[1])))
    shown = [i for i in range(len(result.faces)) if result.confirmed is None or result.confirmed[i]]
    boxes: dict[int, Box] = {}
    for i in shown:
        x1, y1, x2, y2 = (int(round(v)) for v in result.faces.xyxy[i])
        boxes[i] = (x1, y1, x2, y2)
    taken.extend(boxes.values())
    for i in shown:
        age, p_male, gender = face_label_state(result, i)
        label = face_label(age, p_male, gender, shown_age_range(result, i))
        if result.track_ids is not None:
            label = f"#{result.track_ids[i]} {label}"
        colour = _face_colour(gender)
        x1, y1, x2, y2 = boxes[i]
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, max(1, round(scale * 2)))
        width, height, baseline = _text_size(label, scale)
        others = [box for box in taken if box != boxes[i]]
        where = place_label((width, height + 2 * baseline), boxes[i], image.shape[1::-1], others)
        _draw_text(image, label, where[:2], colour, scale)
        taken.append(where)
    return image
