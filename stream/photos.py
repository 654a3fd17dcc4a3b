"""`agestream run IMAGE|FOLDER`: label the faces of still images the way `run` labels a video's,
writing an annotated copy of each image and one JSON line per image, never over a file (but
for --resume, which continues an earlier run's outputs)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

import cv2
import numpy as np
from tqdm import tqdm

from detectors import Detector, create_detector
from estimators import Estimator, create_estimator
from stream.align import pad_to_canvas
from stream.analyzer import FaceAnalyzer
from stream.config import Config, DetectorConfig, EstimatorConfig, OutputConfig, TrackingConfig
from stream.drain import BaseSink, Sink, close_sinks, drain
from stream.outputs import OutputError, check_output_paths, partial_path, write_whole
from stream.overlay import annotate, blur_faces
from stream.processor import FrameProcessor
from stream.records import frame_record
from stream.sinks import VIDEO_SUFFIXES, JsonLinesSink
from stream.sources import read_image
from stream.stages import face_checker
from stream.types import AnnotatedFrame, Faces, Frame, FrameResult

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The JSON lines' default name, in the --output folder.
JSON_NAME = "faces.jsonl"
# Each image is a one-frame clip of its own: one frame a second, so that a track's lifetime
# and smoothing half-life (in seconds) mean what they mean for video.
STILL_FPS = 1.0
# A face whose box spans this share of the image's shorter side fills the frame (a face crop,
# a close selfie): BlazeFace, trained on faces with context around them, misplaces its
# keypoints there (on 300 UTKFace dev crops: age MAE 5.23 and gender 81.7 % as they are, 4.51
# and 89.0 % padded), so such an image is labelled on a canvas twice its size.
FILLS_FRAME = 0.4


# Estimators that can average each face with its mirror image (option `flip`), which photos
# and `evaluate` use: they are not real-time, and the mirrored view lowers the age error.
FLIPPING_ESTIMATORS = ("genderage",)


def still_image_estimator(config: EstimatorConfig, models_dir: str | None) -> Estimator:
    """The estimator for still images: `config`'s, with `flip` on for estimators that have it
    unless the config sets it."""
    options = {name: dict(values) for name, values in config.options.items()}
    named = {name for name in (config.name, config.age, config.gender) if name is not None}
    for name in named & set(FLIPPING_ESTIMATORS):
        options.setdefault(name, {}).setdefault("flip", True)
    return create_estimator(dataclasses.replace(config, options=options), models_dir)


def is_image_source(spec: str) -> bool:
    """True for an existing folder, or an existing file named like an image: what `run` reads
    as still images rather than as a video."""
    path = Path(spec)
    return path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def list_images(source: Path) -> list[Path]:
    """`source` itself, or the folder's image files sorted by name (subfolders are not read).

    Raises:
        FileNotFoundError: a folder without images.
    """
    if not source.is_dir():
        return [source]
    images = sorted(
        path
        for path in source.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not images:
        raise FileNotFoundError(
            f"no images in {source}: expected files ending in {' '.join(IMAGE_SUFFIXES)} "
            "(subfolders are not read)"
        )
    return images


@dataclass(frozen=True)
class PhotoOutputs:
    """Where a run on images writes: annotated copies into `folder`, JSON lines to `json`
    ("-": standard output); either may be None. With `resume`, the images in `done` are
    skipped and the earlier run's records in `kept` are written first."""

    folder: Path | None
    json: str | None
    resume: bool = False
    done: frozenset[str] = frozenset()
    kept: tuple[dict, ...] = ()


def _refuse_existing(path: Path) -> None:
    if path.exists() or path.is_symlink():
        raise OutputError(
            f"{path} already exists; agestream does not overwrite it: choose another --output "
            "folder or move it away"
        )


def _check_folder(folder: Path, source: Path) -> None:
    if folder.suffix.lower() in VIDEO_SUFFIXES:
        raise OutputError(
            f"--output {folder} is a video file name, but {source} is images: give a folder for "
            "the annotated images"
        )
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder} is a file: give a folder for the annotated images")
    input_folder = source if source.is_dir() else source.parent
    if folder.is_dir() and folder.samefile(input_folder):
        raise OutputError(
            f"--output {folder} is the input folder: the annotated images would overwrite the "
            "originals; choose another folder"
        )


def _check_json(json_file: Path, folder: Path | None, images: list[Path]) -> None:
    """Refuse JSON lines onto an input image, or onto (or beside, as partial files) one of
    the annotated copies."""
    for image in images:
        check_output_paths({"JSON lines file": json_file}, image)
    if folder is not None:
        copies = {f"annotated copy of {image.name}": folder / image.name for image in images}
        check_output_paths({"JSON lines file": json_file, **copies}, None)


def _refuse_earlier_outputs(
    folder: Path | None, json_file: Path | None, images: list[Path]
) -> None:
    """Without --resume, no output may exist: name the first and how many more there are."""
    candidates = [] if folder is None else [folder / image.name for image in images]
    if json_file is not None:
        candidates.append(json_file)
    existing = [path for path in candidates if path.exists() or path.is_symlink()]
    if existing:
        more = f" (as do {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise OutputError(
            f"{existing[0]} already exists{more}; agestream does not overwrite it: add --resume "
            "to continue the run that wrote it (images with outputs are skipped), or choose "
            "another --output folder or --json file"
        )


def plan_outputs(
    output: OutputConfig, images: list[Path], source: Path, resume: bool = False
) -> PhotoOutputs:
    """Check the outputs before anything is loaded or written; with `resume`, read what an
    earlier run wrote to them.

    Raises:
        OutputError: one line naming the output and what to do.
    """
    if output.tracks:
        raise OutputError("--tracks is for video: each image is a clip of its own, with no tracks")
    if output.video is None and output.json is None:
        raise OutputError(
            f"images need --output FOLDER (annotated images and {JSON_NAME}) or --json FILE"
        )
    folder = None if output.video is None else Path(output.video)
    if folder is not None:
        _check_folder(folder, source)
    target = output.json
    if target is None and folder is not None:
        target = str(folder / JSON_NAME)
    json_file = None if target in (None, "-") else Path(target)
    if json_file is not None:
        _check_json(json_file, folder, images)
    if not resume:
        _refuse_earlier_outputs(folder, json_file, images)
        return PhotoOutputs(folder, target)
    if folder is None and json_file is None:
        raise OutputError(
            "--resume continues an earlier run: give the --output folder or --json file it wrote"
        )
    return _resumed(PhotoOutputs(folder, target, resume=True), json_file, images)


def _resumed(outputs: PhotoOutputs, json_file: Path | None, images: list[Path]) -> PhotoOutputs:
    """`outputs` with the images an earlier run finished (every output there) and its records
    to keep: all but those of the images labelled again."""
    records = {} if json_file is None else earlier_records(json_file)
    done = {image.name for image in images}
    if outputs.folder is not None:
        done = {name for name in done if (outputs.folder / name).exists()}
    if json_file is not None:
        done &= set(records)
    again = {image.name for image in images} - done
    kept = tuple(record for name, record in records.items() if name not in again)
    log.info("resuming: %d of %d images already done", len(done), len(images))
    return dataclasses.replace(outputs, done=frozenset(done), kept=kept)


def earlier_records(json_file: Path) -> dict[str, dict]:
    """The image records an earlier run wrote to `json_file`, and to its partial file (left by
    a run that did not finish, newer than `json_file`), by image name.

    Raises:
        OutputError: FILE:LINE of a line that is not an image record of `run`.
    """
    records: dict[str, dict] = {}
    for path in (json_file, partial_path(json_file)):
        if path.is_file():
            records.update((record["image"], record) for record in _image_records(path))
    return records


def _image_records(path: Path) -> Iterator[dict]:
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.endswith(b"\n"):  # the last line, cut short by a killed run
                log.warning("%s:%d: leaving out this last line, cut short", path, number)
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError:  # not JSON, or not UTF-8
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise OutputError(
                    f"{path}:{number}: not a JSON line of agestream run on images, so there is "
                    "nothing to resume; choose another --json file"
                )
            yield record


def write_image(path: Path, image: np.ndarray) -> None:
    """`image` encoded as `path`'s extension says, written under its partial name and renamed
    into place only when whole; never over an existing file.

    Raises:
        OutputError: naming the file.
    """
    try:
        ok, data = cv2.imencode(path.suffix, image)
    except cv2.error as error:
        raise OutputError(f"cannot encode {path}: {str(error).strip().splitlines()[-1]}") from None
    if not ok:
        raise OutputError(f"cannot encode {path} as {path.suffix}")
    _refuse_existing(path)  # appeared since the outputs were checked
    try:
        write_whole(path, data.tobytes(), "annotated image")
    except BaseException:
        partial_path(path).unlink(missing_ok=True)  # half an image is of no use to anyone
        raise


class DetectorsByModel:
    """One detector per BlazeFace model the images need (`auto` picks the range by image width,
    as for a video), each made on first use and closed with `stack`."""

    def __init__(self, config: DetectorConfig, models_dir: str | None, stack: ExitStack) -> None:
        self.config, self.models_dir, self.stack = config, models_dir, stack
        self._detectors: dict[str, Detector] = {}

    def for_width(self, width: int) -> Detector:
        from detectors.mediapipe import resolve_model

        model = resolve_model(self.config.model, width, self.config.auto_full_range_width)
        if model not in self._detectors:
            detector = create_detector(self.config, width, self.models_dir)
            self._detectors[model] = self.stack.enter_context(detector)
        return self._detectors[model]


def fills_frame(faces: Faces, shape: tuple[int, ...]) -> bool:
    """Whether the image has no face found, or a face that fills it (see FILLS_FRAME)."""
    if len(faces) == 0:
        return True
    sides = np.maximum(faces.xyxy[:, 2] - faces.xyxy[:, 0], faces.xyxy[:, 3] - faces.xyxy[:, 1])
    return bool(sides.max() >= FILLS_FRAME * min(shape[:2]))


def _moved(result: FrameResult, offset: np.ndarray, frame: Frame) -> FrameResult:
    """`result` of a padded canvas, in the pixels of the image `frame` holds."""
    faces = Faces(
        result.faces.xyxy - np.tile(offset, 2),
        result.faces.score,
        result.faces.keypoints - offset,
    )
    return dataclasses.replace(result, frame=frame, faces=faces)


class PhotoLabeller:
    """The one path from a still image to its labels, shared by `run IMAGE|FOLDER` and
    `evaluate`: the same detector → track (second look included) → estimate → smooth path as
    a video's frames, each image a one-frame clip with a fresh processor whose tracks need one
    hit (so the label rules are video's); an image whose face fills it is labelled on a
    canvas twice its size (replicated borders), the faces given back in the image's pixels.

    Args:
        detectors: one detector per BlazeFace range, chosen by the image's width.
        estimator: the age and gender estimator.
        checker: the second look (None: every detection is a face).
        tracking: the `tracking` settings (`min_hits` is taken as 1).
    """

    def __init__(
        self,
        detectors: DetectorsByModel,
        estimator: Estimator,
        checker: Detector | None,
        tracking: TrackingConfig,
    ) -> None:
        self.detectors, self.estimator, self.checker = detectors, estimator, checker
        self.tracking = dataclasses.replace(tracking, min_hits=1)

    def label(self, image: np.ndarray, name: str) -> FrameResult:
        """The labelled faces of one BGR image, in its own pixels."""
        frame = Frame(image=image, index=0, timestamp=0.0, source_id=name)
        processor = self._processor(image.shape[1])
        detected = processor.detect(frame)
        if detected.faces is not None and fills_frame(detected.faces, image.shape):
            canvas, offset = pad_to_canvas(image)
            padded, _ = self._processor(canvas.shape[1]).process(Frame(canvas, 0, 0.0, name), 0.0)
            if len(padded.faces):
                return _moved(padded, offset, frame)
        # The image's own detection, done once: whether its face fills it, and its labels.
        return processor.process_detected(detected, 0.0)[0]

    def _processor(self, width: int) -> FrameProcessor:
        """A fresh one-frame processor on the detector for an image `width` wide."""
        analyzer = FaceAnalyzer(self.detectors.for_width(width), self.estimator, self.checker)
        return FrameProcessor(analyzer, self.tracking, STILL_FPS)


def image_record(name: str, result: FrameResult) -> dict:
    """The JSON line of one image: its name, size (as labelled) and faces, each face with the
    same fields as in a video's records."""
    height, width = result.frame.image.shape[:2]
    return {"image": name, "width": width, "height": height, "faces": frame_record(result)["faces"]}


@dataclass
class PhotoSummary:
    """What a run on images did, for the summary line."""

    images: int = 0
    faces: int = 0
    skipped: int = 0
    done_before: int = 0
    images_written: int = 0
    wrote: list[str] = field(default_factory=list)
    not_written: list[str] = field(default_factory=list)

    def format(self) -> str:
        text = f"{self.images} images, {self.faces} faces"
        if self.skipped:
            text += f", {self.skipped} skipped (unreadable or too large)"
        if self.done_before:
            text += f", {self.done_before} done by an earlier run"
        if self.wrote:
            text += "; wrote " + " and ".join(self.wrote)
        return text + "".join(f"; NOT written {line}" for line in self.not_written)


class PhotoCopies(BaseSink):
    """Writes each labelled image's annotated copy into `folder` (resuming, one already there
    is whole: written under a partial name, then renamed)."""

    def __init__(self, folder: Path, resume: bool, summary: PhotoSummary) -> None:
        self._folder, self._resume, self._summary = folder, resume, summary
        folder.mkdir(parents=True, exist_ok=True)

    def frame(self, frame: AnnotatedFrame) -> None:
        copy = self._folder / frame.result.frame.source_id
        if not (self._resume and copy.exists()):
            write_image(copy, frame.image)
            self._summary.images_written += 1

    def report(self) -> list[str]:
        return [f"{self._folder} ({self._summary.images_written} images)"]


class ImageRecords(BaseSink):
    """One JSON line per labelled image, after the earlier run's lines when resuming."""

    def __init__(self, path: str, kept: tuple[dict, ...]) -> None:
        self._sink = JsonLinesSink(path)
        for record in kept:
            self._sink.write(record)

    def frame(self, frame: AnnotatedFrame) -> None:
        self._sink.write(image_record(frame.result.frame.source_id, frame.result))

    def close(self) -> None:
        self._sink.close()

    def report(self) -> list[str]:
        sink = self._sink
        if str(sink.path) == "-":
            return []
        if sink.finished:
            return [f"{sink.path} ({sink.lines_written} lines)"]
        return [f"NOT written {sink.path}: {sink.lines_written} lines kept in {sink.kept}"]


class PhotoCounts(BaseSink):
    """Counts the labelled images and their faces into the summary."""

    def __init__(self, summary: PhotoSummary) -> None:
        self._summary = summary

    def frame(self, frame: AnnotatedFrame) -> None:
        self._summary.images += 1
        self._summary.faces += len(frame.result.faces)


def _labelled(
    images: list[Path],
    labeller: PhotoLabeller,
    outputs: PhotoOutputs,
    output: OutputConfig,
    summary: PhotoSummary,
) -> Iterator[AnnotatedFrame]:
    """Each image labelled (and annotated when copies are written), in order; those done by
    an earlier run, unreadable or too large are counted and left out."""
    for path in tqdm(images, unit="image", disable=None, leave=False):
        if path.name in outputs.done:
            summary.done_before += 1
            continue
        image = read_image(path, path.name)
        if image is None:
            summary.skipped += 1
            continue
        result = labeller.label(image, path.name)
        if output.blur:
            blur_faces(image, result.faces)
        drawn = image if outputs.folder is None else annotate(result, None)
        yield AnnotatedFrame(result, drawn)


def run_images(config: Config, source: Path, summary: PhotoSummary, resume: bool = False) -> None:
    """Label an image, or every image of a folder, filling `summary` as it goes; with
    `resume`, only the images an earlier run left without outputs.

    Images that cannot be read or are too large are skipped with a warning; the JSON lines
    are finalized however the run ends (Ctrl-C too), and each annotated image is whole or
    absent.

    Raises:
        FileNotFoundError, OutputError, ModelError, ConfigError: fatal problems, one line each.
    """
    images = list_images(source)
    if config.output.max_frames is not None:
        images = images[: config.output.max_frames]
    outputs = plan_outputs(config.output, images, source, resume)
    estimator = still_image_estimator(config.estimator, config.models_dir)
    log.info("%d images from %s", len(images), source)
    with ExitStack() as stack:
        detectors = DetectorsByModel(config.detector, config.models_dir, stack)
        labeller = PhotoLabeller(detectors, estimator, face_checker(config, stack), config.tracking)
        sinks: list[Sink] = []
        # Reported once closed: a file whose finishing failed is not reported as written.
        reported: list[str] = []
        stack.callback(_report, summary, reported)
        stack.callback(close_sinks, sinks, reported)
        if outputs.folder is not None:
            sinks.append(PhotoCopies(outputs.folder, outputs.resume, summary))
        if outputs.json is not None:
            sinks.append(ImageRecords(outputs.json, outputs.kept))
        sinks.append(PhotoCounts(summary))
        drain(_labelled(images, labeller, outputs, config.output, summary), sinks, Event())


def _report(summary: PhotoSummary, reported: list[str]) -> None:
    for line in reported:
        if line.startswith("NOT written "):
            summary.not_written.append(line.removeprefix("NOT written "))
        else:
            summary.wrote.append(line)
