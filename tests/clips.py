"""Clips made from the shared ones for label, track and identity tests, with their ground
truth: several people at once (a grid of clips), a person who leaves and comes back, footage
with no face, hard cuts between people at one place, a queue of people replacing one another
at one spot, two people dressed alike; and the truth of the shared clips themselves."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from detectors import Detector, create_detector
from stream.config import DetectorConfig
from stream.reports.bench import decoded_frames

FPS = 30.0

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Appearance:
    """One person on screen from `first_frame` to `last_frame` (inclusive). A detected face is
    theirs when its box's centre lies in `region` (x1, y1, x2, y2; None: anywhere in the
    frame). `age` in years where it is known (a UTKFace photo's name gives it)."""

    person: str
    first_frame: int
    last_frame: int
    region: Box | None = None
    age: int | None = None

    def holds(self, frame: int, box: Box) -> bool:
        if not self.first_frame <= frame <= self.last_frame:
            return False
        if self.region is None:
            return True
        x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return self.region[0] <= x < self.region[2] and self.region[1] <= y < self.region[3]


@dataclass(frozen=True)
class Truth:
    """Who is on screen when and where. `count_only`: only the number of people is known
    (`count`), not which face is whose."""

    appearances: tuple[Appearance, ...]
    count_only: bool = False
    count: int | None = None

    @property
    def people(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.person for a in self.appearances))

    @property
    def people_count(self) -> int:
        return self.count if self.count is not None else len(self.people)

    def person_at(self, frame: int, box: Box) -> str | None:
        """The true person a face detected at `box` in `frame` belongs to; None for a face
        where the truth has nobody (a false detection), or in a count-only truth."""
        if self.count_only:
            return None
        return next((a.person for a in self.appearances if a.holds(frame, box)), None)

    def age_of(self, person: str) -> int | None:
        return next((a.age for a in self.appearances if a.person == person), None)

    def later(self, frames: int) -> Truth:
        """The same people, `frames` frames later (the clip placed after other footage)."""
        moved = (
            replace(a, first_frame=a.first_frame + frames, last_frame=a.last_frame + frames)
            for a in self.appearances
        )
        return replace(self, appearances=tuple(moved))

    def placed(self, scale: float, left: float, top: float, cell: Box, frames: int) -> Truth:
        """The truth of a clip scaled by `scale`, moved to (`left`, `top`) inside `cell` of a
        larger frame and cut to its first `frames` frames (as `grid_clip` places it)."""
        placed = []
        for a in self.appearances:
            if a.first_frame >= frames:
                continue
            region = cell
            if a.region is not None:
                x1, y1, x2, y2 = a.region
                region = (left + scale * x1, top + scale * y1, left + scale * x2, top + scale * y2)
            last = min(a.last_frame, frames - 1)
            placed.append(replace(a, last_frame=last, region=region))
        return replace(self, appearances=tuple(placed))


def _frames(
    path: Path, size: tuple[int, int] | None = None, start: int = 0, count: int | None = None
) -> list[np.ndarray]:
    """The clip's frames (`count` of them from `start`, else all), resized to `size`."""
    capture = cv2.VideoCapture(str(path))
    skipped = 0
    while skipped < start and capture.grab():  # decoded in order (seeking is not exact)
        skipped += 1
    frames = []
    while count is None or len(frames) < count:
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


def _fit_placement(
    shape: tuple[int, ...], size: tuple[int, int]
) -> tuple[float, int, int, tuple[int, int]]:
    """How `_fit` places an image of `shape` in `size`: scale, left, top and scaled size."""
    width, height = size
    scale = min(width / shape[1], height / shape[0])
    scaled = (round(shape[1] * scale), round(shape[0] * scale))
    return scale, (width - scaled[0]) // 2, (height - scaled[1]) // 2, scaled


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` scaled to fit `size` (w, h) without distortion, centred on black."""
    _, left, top, scaled = _fit_placement(image.shape, size)
    resized = cv2.resize(image, scaled)
    cell = np.zeros((size[1], size[0], 3), np.uint8)
    cell[top : top + scaled[1], left : left + scaled[0]] = resized
    return cell


# --- The truth of the shared clips (checked by eye on their frames) -------------------------

# One person each, six different people: d3 a woman with long brown hair and hoop earrings,
# d10 a young woman with long black hair, d13 an East Asian man with glasses in a striped
# T-shirt, d19 a young man with round glasses in a grey hoodie, s18 a young red-haired woman in
# a blue top, s32 a blonde woman in a dark blazer. s18's region leaves out the background right
# of her in the picture, where BlazeFace finds a false face from frame 246 on.
SINGLE_PERSON = {
    "livePortrait__driving__d3": ("d3", None),
    "livePortrait__driving__d10": ("d10", None),
    "livePortrait__driving__d13": ("d13", None),
    "livePortrait__driving__d19": ("d19", None),
    "livePortrait__source__s18": ("s18", (480.0, 0.0, 960.0, 540.0)),
    "livePortrait__source__s32": ("s32", None),
}

# Hamilton (640x360, 275 frames): four shots, cut at frames 20, 82 and 211. Frames 0-19, a wide
# stage shot: the performer (short hair, dark suit) and, at the piano on the left, the pianist
# (curly hair, light blue shirt); both faces ~20 px, never detected (a false face on the
# chandelier at frames 9-11 falls in neither region). 20-81: the pianist's profile in
# close-up (a false face on a hand at frame 67 counts as his). 82-210: the performer, frontal
# medium shot. 211-274: the audience, three face boxes side by side: a woman on the left, an
# older woman, and one box that covers both Barack and Michelle Obama's faces (the detector
# never separates them: one "person" here).
HAMILTON = "face_recognition__short_hamilton_clip"
HAMILTON_SHOTS: tuple[tuple[str, int, int | None, Box | None], ...] = (
    ("hamilton:performer", 0, 19, (470.0, 0.0, 620.0, 130.0)),
    ("hamilton:pianist", 0, 19, (0.0, 140.0, 140.0, 260.0)),
    ("hamilton:pianist", 20, 81, None),
    ("hamilton:performer", 82, 210, None),
    ("hamilton:woman-left", 211, None, (0.0, 0.0, 150.0, 360.0)),
    ("hamilton:older-woman", 211, None, (150.0, 0.0, 290.0, 360.0)),
    ("hamilton:obama-couple", 211, None, (290.0, 0.0, 480.0, 360.0)),
)


def shared_truth(path: Path) -> Truth:
    """The truth of a shared clip (KeyError for a clip not described here)."""
    last = decoded_frames(path) - 1
    if path.stem == HAMILTON:
        shots = HAMILTON_SHOTS
        return Truth(tuple(Appearance(p, a, last if b is None else b, r) for p, a, b, r in shots))
    person, region = SINGLE_PERSON[path.stem]
    return Truth((Appearance(person, 0, last, region),))


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


def grid_truth(paths: list[Path], cell: tuple[int, int] = (640, 360)) -> Truth:
    """The truth of `grid_clip(paths, ..., cell)`: each clip's people, inside its cell."""
    length = min(decoded_frames(path) for path in paths)
    appearances: list[Appearance] = []
    for i, path in enumerate(paths):
        capture = cv2.VideoCapture(str(path))
        shape = (
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        )
        capture.release()
        scale, left, top, _ = _fit_placement(shape, cell)
        x, y = (i % 2) * cell[0], (i // 2) * cell[1]
        box = (float(x), float(y), float(x + cell[0]), float(y + cell[1]))
        truth = shared_truth(path).placed(scale, x + left, y + top, box, length)
        appearances += truth.appearances
    return Truth(tuple(appearances))


def leave_and_return_clip(path: Path, out: Path, away_s: float = 3.0) -> Path:
    """The clip, `away_s` of black (longer than a track lives unseen), then the clip again:
    one person who leaves and comes back."""
    frames = _frames(path)
    away = [np.zeros_like(frames[0])] * round(away_s * FPS)
    return _write(out, frames + away + frames)


def leave_and_return_truth(path: Path, away_s: float = 3.0) -> Truth:
    """The truth of `leave_and_return_clip(path, ..., away_s)`: the clip's people twice."""
    truth = shared_truth(path)
    again = truth.later(decoded_frames(path) + round(away_s * FPS))
    return Truth(truth.appearances + again.appearances)


def no_face_clip(paths: list[Path], out: Path, side: int = 224, per_clip: int = 8) -> Path:
    """From each clip, up to `per_clip` `side`-pixel squares that keep clear of every face
    BlazeFace finds in it (full-range, low threshold, boxes grown by their own size), each
    over the frames where it is clear: real footage (hands, hair, clothes, rooms, crowds out
    of focus) with no face, one square after another. Its truth is `NO_ONE`."""
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


NO_ONE = Truth(())


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


# --- Who is who: clips where one person replaces another at the same place -----------------

SIZE = (640, 480)
# A UTKFace photo's person and age come from its name: AGE_GENDER_RACE_DATETIME.jpg.chip.jpg.
CHILD_PHOTO = "4_1_0_20170109192424440.jpg.chip.jpg"
# Hard cuts: (clip, first frame, frames) of six different people, the child's photo after the
# last adult (the bug: a child shown with the previous adult's smoothed age), then the first
# person again, later in her clip. Each segment is where its face moves least (s32's moves
# most: from frame 84 it drifts an eighth of its width).
CUT_SEGMENTS = (
    ("livePortrait__driving__d3", 60, 60),
    ("livePortrait__driving__d10", 204, 54),
    ("livePortrait__driving__d13", 108, 66),
    ("livePortrait__driving__d19", 24, 60),
    ("livePortrait__source__s18", 66, 48),
    ("livePortrait__source__s32", 84, 60),
)
CHILD_FRAMES = 75
RETURN_SEGMENT = ("livePortrait__driving__d3", 294, 60)
CUT_FACE_AT, CUT_FACE_WIDTH = (320.0, 230.0), 220.0
# A queue at one spot: (photo, frames shown, frames of empty room after it); four people of
# visibly different age and gender, the next one 0, 5 and 15 frames after the last left.
QUEUE = (
    ("27_0_0_20170104172424772.jpg.chip.jpg", 54, 0),
    ("39_1_3_20170109140636847.jpg.chip.jpg", 50, 5),
    ("63_0_0_20170111171747601.jpg.chip.jpg", 57, 15),
    ("70_1_0_20170110141008498.jpg.chip.jpg", 48, 0),
)
QUEUE_FACE_AT, QUEUE_FACE_WIDTH = (320.0, 200.0), 150.0
# Two different women of 24 and 28, brown hair, on one body (s18's red hair and blue top,
# frame 60), 2 s each with 2 s of empty room between: longer than a track lives unseen,
# well within re-identification's 30 s.
DRESSED_ALIKE = ("24_1_0_20170111182452767.jpg.chip.jpg", "28_1_0_20170105000649036.jpg.chip.jpg")
BODY_FRAME = ("livePortrait__source__s18", 60)
BODY_FEATHER = 12.0
DRESSED_SHOWN, DRESSED_GAP, DRESSED_FACE_WIDTH = 60, 60, 150.0
# The room: s18's background left of her, face-free.
ROOM = ("livePortrait__source__s18", (0, 0, 560, 420))

Piece = tuple[str | None, int | None, list[np.ndarray]]


def photo_person(name: str) -> str:
    return "utkface:" + name.split(".")[0]


def photo_age(name: str) -> int:
    return int(name.split("_")[0])


@contextmanager
def _finder() -> Iterator[Detector]:
    """BlazeFace full range, which finds both close and far faces, to line faces up with."""
    with create_detector(DetectorConfig(model="full"), SIZE[0]) as detector:
        yield detector


def _face_box(finder: Detector, images: list[np.ndarray]) -> np.ndarray:
    """The median box of the largest face found in each image."""
    boxes = []
    for image in images:
        found = finder.detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).xyxy
        if len(found):
            boxes.append(max(found, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))
    if not boxes:
        raise ValueError("no face found to line the clip up with")
    return np.median(np.array(boxes), axis=0)


def _photo(path: Path, finder: Detector) -> tuple[np.ndarray, np.ndarray]:
    """A UTKFace photo and its face box; found on a larger canvas, as the crops are tight."""
    photo = cv2.imread(str(path))
    if photo is None:
        raise FileNotFoundError(f"not a readable image: {path}")
    pad = photo.shape[0]
    canvas = cv2.copyMakeBorder(photo, pad, pad, pad, pad, cv2.BORDER_CONSTANT)
    return photo, _face_box(finder, [canvas]) - pad


def _matrix(box: np.ndarray, at: tuple[float, float], face_width: float) -> np.ndarray:
    """The scaling and shift that make `box` `face_width` wide, centred at `at`."""
    scale = face_width / (box[2] - box[0])
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return np.float32([[scale, 0, at[0] - scale * centre_x], [0, scale, at[1] - scale * centre_y]])


def _align(
    image: np.ndarray, box: np.ndarray, at: tuple[float, float], face_width: float
) -> np.ndarray:
    """A SIZE frame of `image`, scaled and moved so that its face `box` is `face_width` wide
    and centred at `at`; black where the image does not reach."""
    matrix = _matrix(box, at, face_width)
    scale = float(matrix[0, 0])
    if scale < 1:  # shrink by area averaging first: a warp alone would alias
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        matrix[0, 0] = matrix[1, 1] = 1.0
    return cv2.warpAffine(image, matrix, SIZE, flags=cv2.INTER_LINEAR)


class _Grain:
    """Sensor-like noise, so that no two frames are the same: each frame gets a different
    window of one random field (drawing fresh noise for every frame is most of a clip's
    build time)."""

    def __init__(self, seed: int, sigma: float = 3.0) -> None:
        self.rng = np.random.default_rng(seed)
        shape = (SIZE[1] * 2, SIZE[0] * 2, 3)
        self.field = np.round(self.rng.normal(0, sigma, shape)).astype(np.int16)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        y = int(self.rng.integers(0, self.field.shape[0] - height))
        x = int(self.rng.integers(0, self.field.shape[1] - width))
        return np.clip(image + self.field[y : y + height, x : x + width], 0, 255).astype(np.uint8)


def _oval(shape: tuple[int, ...]) -> np.ndarray:
    """A soft oval alpha mask (0..1) filling an image of `shape`: blends a face in."""
    height, width = shape[:2]
    mask = np.zeros((height, width), np.float32)
    cv2.ellipse(mask, (width // 2, height // 2), (width * 9 // 20, height // 2), 0, 0, 360, 1, -1)
    return cv2.GaussianBlur(mask, (0, 0), width / 20)


def _blend(scene: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return (scene * (1 - alpha[..., None]) + layer * alpha[..., None]).astype(np.uint8)


def _paste(
    scene: np.ndarray, photo: np.ndarray, box: np.ndarray, at: tuple[float, float], width: float
) -> np.ndarray:
    """`scene` with the photo's face (`box`) `width` wide at `at`, through a soft oval."""
    matrix = _matrix(box, at, width)
    size = (scene.shape[1], scene.shape[0])
    layer = cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR)
    return _blend(scene, layer, cv2.warpAffine(_oval(photo.shape), matrix, size))


def _drift(at: tuple[float, float], t: int) -> tuple[float, float]:
    """`at` moved a few pixels, slowly: a person who stands still, but not frozen."""
    return at[0] + 3 * np.sin(2 * np.pi * t / 45), at[1] + 2 * np.sin(2 * np.pi * t / 60)


def _room(videos: Path) -> np.ndarray:
    stem, (x1, y1, x2, y2) = ROOM
    frame = _frames(videos / f"{stem}.mp4", count=1)[0]
    return cv2.resize(frame[y1:y2, x1:x2], SIZE, interpolation=cv2.INTER_LINEAR)


def _sequence(pieces: list[Piece]) -> tuple[list[np.ndarray], Truth]:
    """The pieces' frames one after another, and who is on screen when (person None: no one)."""
    frames: list[np.ndarray] = []
    appearances = []
    for person, age, images in pieces:
        if person is not None:
            last = len(frames) + len(images) - 1
            appearances.append(Appearance(person, len(frames), last, age=age))
        frames += images
    return frames, Truth(tuple(appearances))


def _lined_up(videos: Path, segment: tuple[str, int, int], finder: Detector) -> Piece:
    """A segment of a shared clip with its face lined up at CUT_FACE_AT, CUT_FACE_WIDTH wide
    (the segment's median box: the head still moves as it does in the clip)."""
    stem, start, count = segment
    images = _frames(videos / f"{stem}.mp4", start=start, count=count)
    box = _face_box(finder, images[::6])
    lined_up = [_align(image, box, CUT_FACE_AT, CUT_FACE_WIDTH) for image in images]
    return SINGLE_PERSON[stem][0], None, lined_up


def _ken_burns(photo_path: Path, count: int, finder: Detector) -> Piece:
    """A photo made into footage: a slow zoom (10 %) and pan, with noise, its face lined up
    with the clips' (CUT_FACE_AT, CUT_FACE_WIDTH) on black."""
    photo, box = _photo(photo_path, finder)
    grain = _Grain(4)
    frames = []
    for t in np.linspace(0.0, 1.0, count):
        at = (CUT_FACE_AT[0] + 8 * t - 4, CUT_FACE_AT[1] + 3 * np.sin(np.pi * t))
        frames.append(grain(_align(photo, box, at, CUT_FACE_WIDTH * (1 + 0.1 * t))))
    return photo_person(photo_path.name), photo_age(photo_path.name), frames


def cuts_clip(videos: Path, utkface: Path, out: Path) -> tuple[Path, Truth]:
    """Hard cuts between six different people filmed "at the same place" (d3, d10, d13, d19,
    s18, s32: 1.6-2.2 s each, every face lined up to one spot and size, so that boxes overlap
    across each cut), a 4-year-old's photo as 2.5 s of footage right after the last adult,
    then d3 again 2 s (later in her clip): 483 frames, 640x480, 30 FPS."""
    with _finder() as finder:
        pieces = [_lined_up(videos, segment, finder) for segment in CUT_SEGMENTS]
        pieces.append(_ken_burns(utkface / CHILD_PHOTO, CHILD_FRAMES, finder))
        pieces.append(_lined_up(videos, RETURN_SEGMENT, finder))
    frames, truth = _sequence(pieces)
    return _write(out, frames), truth


def queue_clip(videos: Path, utkface: Path, out: Path) -> tuple[Path, Truth]:
    """Four people (UTKFace photos: a man of 27, a woman of 39, a man of 63, a woman of 70)
    one after another at one spot of a still room, faces 140 px, 1.6-1.9 s each, the next
    arriving 0, 5 and 15 frames after the last left; faces drift a few pixels, and every frame
    has noise. Only the face region changes: no cut to detect. 229 frames, 640x480."""
    grain = _Grain(0)
    room = _room(videos)
    pieces: list[Piece] = []
    with _finder() as finder:
        for name, shown, gap in QUEUE:
            photo, box = _photo(utkface / name, finder)
            at = [_drift(QUEUE_FACE_AT, t) for t in range(shown)]
            faces = [grain(_paste(room, photo, box, xy, QUEUE_FACE_WIDTH)) for xy in at]
            pieces.append((photo_person(name), photo_age(name), faces))
            pieces.append((None, None, [grain(room) for _ in range(gap)]))
    frames, truth = _sequence(pieces)
    return _write(out, frames), truth


def _body(videos: Path, finder: Detector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s18's head and shoulders (red hair, neck, blue top) in a SIZE frame, her face
    DRESSED_FACE_WIDTH wide in the middle and her clothes down to the bottom: the layer, its
    alpha (soft at the sides and top) and her face box."""
    stem, index = BODY_FRAME
    frame = _frames(videos / f"{stem}.mp4", start=index, count=1)[0]
    box = _face_box(finder, [frame])
    scale = DRESSED_FACE_WIDTH / (box[2] - box[0])
    at = (SIZE[0] / 2, SIZE[1] - scale * (frame.shape[0] - (box[1] + box[3]) / 2))
    layer = _align(frame, box, at, DRESSED_FACE_WIDTH)
    matrix = _matrix(box, at, DRESSED_FACE_WIDTH)
    face_box = box * matrix[0, 0] + np.tile(matrix[:, 2], 2)
    width, height = face_box[2] - face_box[0], face_box[3] - face_box[1]
    alpha = np.zeros((SIZE[1], SIZE[0]), np.float32)
    # Soft edges, kept clear of the black above her frame's top edge (at matrix[1, 2]).
    top = max(face_box[1] - 0.8 * height, matrix[1, 2] + 3 * BODY_FEATHER)
    corner = (int(at[0] - 1.25 * width), int(top))
    cv2.rectangle(alpha, corner, (int(at[0] + 1.25 * width), SIZE[1] + 40), 1, -1)
    return layer, cv2.GaussianBlur(alpha, (0, 0), BODY_FEATHER), face_box


def dressed_alike_clip(videos: Path, utkface: Path, out: Path) -> tuple[Path, Truth]:
    """Two different women (UTKFace photos, 24 and 28, both with brown hair) on the same body,
    hair and clothes (s18's) in the same still room, 2 s each with 2 s of the empty room
    between them: a look by colours of hair, face and clothes calls them one person. Faces
    150 px, drifting a few pixels, noise on every frame. 180 frames, 640x480."""
    grain = _Grain(1)
    room = _room(videos)
    with _finder() as finder:
        body, alpha, face_box = _body(videos, finder)
        photos = [(name, *_photo(utkface / name, finder)) for name in DRESSED_ALIKE]
    at = ((face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2)
    # A little wider than her face box, so none of her own face shows around the new one.
    width = 1.05 * (face_box[2] - face_box[0])
    pieces: list[Piece] = []
    for name, photo, box in photos:
        person = _paste(body, photo, box, at, width)
        frames = []
        for t in range(DRESSED_SHOWN):
            dx, dy = _drift((0.0, 0.0), t)
            shift = np.float32([[1, 0, dx], [0, 1, dy]])
            moved = [cv2.warpAffine(layer, shift, SIZE) for layer in (person, alpha)]
            frames.append(grain(_blend(room, *moved)))
        pieces.append((photo_person(name), photo_age(name), frames))
    gap: Piece = (None, None, [grain(room) for _ in range(DRESSED_GAP)])
    frames, truth = _sequence([pieces[0], gap, pieces[1]])
    return _write(out, frames), truth


# A person counts as held by an id only with this many frames: one-frame box noise (a face
# box that strays into a neighbour's region) is not a merge.
MIN_FRAMES = 5
CHILD_AGE, ADULT_AGE = 13, 18


def holdings(records: list[dict], truth: Truth) -> dict[int, Counter[str]]:
    """Per person id, the frames in which it held each true person's face."""
    held: dict[int, Counter[str]] = defaultdict(Counter)
    for record in records:
        for face in record["faces"]:
            if face["track"] is None:
                continue
            people = held[face["track"]]  # an id holding no true person is an id too
            person = truth.person_at(record["frame"], face["box"])
            if person is not None:
                people[person] += 1
    return held


def merges_and_splits(held: dict[int, Counter[str]], truth: Truth) -> tuple[int, int, int]:
    """Ids holding more than one true person, the extra ids each person was given, and the
    people no id holds (never detected, or never confirmed)."""
    holders: Counter[str] = Counter()
    merges = 0
    for people in held.values():
        kept = [person for person, frames in people.items() if frames >= MIN_FRAMES]
        merges += len(kept) > 1
        holders.update(kept)
    missed = sum(person not in holders for person in truth.people)
    return merges, sum(count - 1 for count in holders.values()), missed


def children_with_adult_age(records: list[dict], truth: Truth) -> int | None:
    """Faces of a child (truth's age under CHILD_AGE) shown aged ADULT_AGE or more; None when
    the clip has no child."""
    if not any(a.age is not None and a.age < CHILD_AGE for a in truth.appearances):
        return None
    wrong = 0
    for record in records:
        for face in record["faces"]:
            if face["track"] is None or face["age"] is None:
                continue
            age = truth.age_of(truth.person_at(record["frame"], face["box"]) or "")
            wrong += age is not None and age < CHILD_AGE and face["age"] >= ADULT_AGE
    return wrong
