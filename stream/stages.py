"""The stage toolkit that `run` and `serve` build a stream from: the capture → detection →
processing threads and their buffers, the processor each stream owns (detector, face checker,
tracker, smoothing, identities), how the stages stop, and the run's summary.

One stop Event ends every stage; every blocking call has a timeout; END_OF_STREAM always
reaches the end of each buffer, so no stage can wait forever on another.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from detectors import Detector, create_detector
from estimators import Estimator
from stream.analyzer import FACE_CHECK_SIZE, FaceAnalyzer, detector_config_for_checks
from stream.buffers import END_OF_STREAM, BlockingBuffer, Empty, FrameBuffer, make_buffer
from stream.config import Config
from stream.face_id import FaceEmbedder, create_face_embedder
from stream.outputs import UTC_STAMP
from stream.overlay import Drawing, HudStats, annotate, blur_faces
from stream.processor import Detected, FrameProcessor
from stream.sources import CaptureThread, VideoSource
from stream.types import AnnotatedFrame, Frame, FrameResult, SourceInfo, StreamStart

log = logging.getLogger(__name__)

POLL_S = 0.1
JOIN_TIMEOUT_S = 2.0
RESULT_QUEUE_SIZE = 4
DETECTED_QUEUE_SIZE = 2


class RateMeter:
    """Events per second over a sliding window, for the HUD."""

    def __init__(self, window_s: float = 1.0) -> None:
        self._window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        while self._times and now - self._times[0] > self._window_s:
            self._times.popleft()

    @property
    def rate(self) -> float:
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-9)


@dataclass
class RunSummary:
    source_id: str
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    skipped_frames: int = 0
    undecodable_frames: int = 0
    faces_estimated: int = 0
    dropped: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    source_fps: float = 0.0
    outputs: list[str] = field(default_factory=list)

    @property
    def processing_fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def count(self, result: FrameResult) -> None:
        """Account for one frame written to the outputs."""
        self.frames += 1
        self.faces += len(result.faces)
        self.frames_with_faces += bool(len(result.faces))

    def format(self) -> str:
        text = (
            f"{self.source_id}: {self.frames} frames in {self.elapsed_s:.1f} s "
            f"({self.processing_fps:.1f} FPS processed, source {self.source_fps:.1f} FPS), "
            f"{self.faces} faces in {self.frames_with_faces} frames "
            f"({self.faces_estimated} estimated), {self.dropped} dropped"
        )
        if self.reconnects:
            text += f", {self.reconnects} reconnects"
        if self.undecodable_frames:
            text += f", {self.undecodable_frames} undecodable frames skipped"
        if self.skipped_frames:
            text += f", {self.skipped_frames} frames skipped after errors"
        return text + "".join(f"\n  {output}" for output in self.outputs)


def describe(info: SourceInfo) -> str:
    kind = f"file of {info.frame_count} frames" if info.is_file else "live (newest frame wins)"
    return f"{info.width}x{info.height} at {info.fps:.2f} FPS, {kind}"


def media_time_ms(frame: Frame, info: SourceInfo, start: float) -> float:
    """Position in the video for files; time since the first frame for live sources."""
    if info.is_file:
        if frame.position_ms is not None:
            return frame.position_ms
        return frame.index * 1000.0 / info.fps
    return (frame.timestamp - start) * 1000.0


class DetectionThread(threading.Thread):
    """Detects faces one frame ahead of the processing thread, for file sources.

    Detection is stateless and the costliest step of a frame, so on its own thread it
    overlaps with tracking, estimation and annotation of the previous frame. Live sources
    do without it: a second hand-off would add a second waiting frame, and latency.
    """

    def __init__(
        self,
        processor: FrameProcessor,
        frames: FrameBuffer,
        detected: BlockingBuffer,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="detection", daemon=True)
        self.processor = processor
        self.frames = frames
        self.detected = detected
        self.stop = stop
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    frame = self.frames.get(timeout=POLL_S)
                except Empty:
                    continue
                if frame is END_OF_STREAM or not self.detected.put(self.processor.detect(frame)):
                    break
        except Exception as error:  # re-raised on the main thread
            self.error = error
        finally:
            self.detected.put(END_OF_STREAM)


class ProcessingThread(threading.Thread):
    """Takes frames (detecting them itself) or detected frames from the detection thread;
    tracks, estimates and annotates them, hands them to the sinks.

    Each item put into `results` is an `AnnotatedFrame`, drawn as `drawing` says.
    """

    def __init__(
        self,
        processor: FrameProcessor,
        inputs: FrameBuffer,
        results: BlockingBuffer,
        capture: CaptureThread,
        info: SourceInfo,
        stop: threading.Event,
        drawing: Drawing,
    ) -> None:
        super().__init__(name="processing", daemon=True)
        self.processor = processor
        self.inputs = inputs
        self.results = results
        self.capture = capture
        self.info = info
        self.stop = stop
        self.drawing = drawing
        self.meter = RateMeter()
        self.started_at = time.monotonic()
        self.first_timestamp: float | None = None
        self.skipped_frames = 0
        self.error: Exception | None = None

    def source_fps(self) -> float:
        if self.info.is_file:
            return self.info.fps
        elapsed = time.monotonic() - self.started_at
        return self.capture.frames_read / elapsed if elapsed > 0 else 0.0

    def _process(self, detected: Detected) -> tuple[FrameResult, list[int]]:
        frame = detected.frame
        if self.first_timestamp is None:
            self.first_timestamp = frame.timestamp
        t_ms = media_time_ms(frame, self.info, self.first_timestamp)
        try:
            return self.processor.process_detected(detected, t_ms)
        except Exception as error:  # one bad frame must not end the run or lose a file's frame
            self.skipped_frames += 1
            return self.processor.skipped(frame, t_ms, error), []

    def _draw(self, result: FrameResult) -> np.ndarray:
        if self.drawing.blur:  # before the labels, which stay readable
            blur_faces(result.frame.image, result.faces)
            if result.outside is not None:
                blur_faces(result.frame.image, result.outside)
        stats = None
        if self.drawing.hud:
            stats = HudStats(self.meter.rate, self.source_fps(), self.capture.drops)
        return annotate(result, stats, self.drawing.scale)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    item = self.inputs.get(timeout=POLL_S)
                except Empty:
                    continue
                if item is END_OF_STREAM:
                    break
                detected = item if isinstance(item, Detected) else self.processor.detect(item)
                result, ended = self._process(detected)
                self.meter.tick(time.monotonic())
                if not self.results.put(AnnotatedFrame(result, self._draw(result), tuple(ended))):
                    break
        except Exception as error:  # re-raised on the main thread
            self.error = error
        finally:
            self.results.put(END_OF_STREAM)


def make_source(
    config: Config, source_spec: str | VideoSource, wait_at_start: bool = False
) -> VideoSource:
    """The run's source: as given, or opened lazily from a CLI/config source argument; with
    `wait_at_start` a camera URL that is down when it opens is retried until it answers."""
    if isinstance(source_spec, VideoSource):
        return source_spec
    return VideoSource(
        source_spec,
        open_timeout_ms=int(config.source.open_timeout_s * 1000),
        read_timeout_ms=int(config.source.read_timeout_s * 1000),
        rtsp_transport=config.source.rtsp_transport,
        wait_at_start=wait_at_start,
    )


@dataclass(frozen=True)
class Stages:
    """The run's threads, in pipeline order, and the buffer the main thread reads."""

    capture: CaptureThread
    detection: DetectionThread | None
    processing: ProcessingThread
    results: BlockingBuffer

    @property
    def threads(self) -> list[threading.Thread]:
        return [s for s in (self.capture, self.detection, self.processing) if s is not None]

    def raise_error(self) -> None:
        """Re-raise the error that ended a stage, the last stage's first."""
        for stage in (self.processing, self.detection, self.capture):
            if stage is not None and stage.error is not None:
                raise stage.error


def build_stages(
    processor: FrameProcessor,
    source: VideoSource,
    queue_size: int,
    stop: threading.Event,
    drawing: Drawing,
) -> Stages:
    info = source.info
    frames = make_buffer(info.is_file, queue_size, stop)
    results: BlockingBuffer[AnnotatedFrame] = BlockingBuffer(RESULT_QUEUE_SIZE, stop)
    capture = CaptureThread(source, frames, stop)
    detection, processing_inputs = None, frames
    if info.is_file:
        processing_inputs = BlockingBuffer(DETECTED_QUEUE_SIZE, stop)
        detection = DetectionThread(processor, frames, processing_inputs, stop)
    processing = ProcessingThread(
        processor, processing_inputs, results, capture, info, stop, drawing
    )
    return Stages(capture, detection, processing, results)


def stop_stages(stages: Stages, summary: RunSummary, source: VideoSource) -> None:
    """Stop every thread and fill in the summary; a second Ctrl-C meanwhile is ignored, so
    that the outputs are finalized whatever the user presses."""
    ignore_interrupts_while_finishing()
    stages.capture.stop_event.set()
    for stage in reversed(stages.threads):
        stage.join(JOIN_TIMEOUT_S)
    processing = stages.processing
    summary.elapsed_s = time.monotonic() - processing.started_at
    summary.dropped = stages.capture.drops
    summary.reconnects = source.reconnects
    summary.skipped_frames = processing.skipped_frames
    summary.undecodable_frames = source.undecodable
    summary.source_fps = processing.source_fps()
    summary.faces_estimated = processing.processor.faces_estimated


def ignore_interrupts_while_finishing() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def finishing(signum: int, frame: object) -> None:
        log.warning("already stopping: finishing the outputs")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, finishing)


def face_checker(config: Config, stack: ExitStack) -> Detector | None:
    """The second detector that confirms new tracks are faces, or None when
    `tracking.face_check_score` is 0."""
    if not config.tracking.face_check_score:
        return None
    settings = detector_config_for_checks(config.detector)
    return stack.enter_context(create_detector(settings, FACE_CHECK_SIZE, config.models_dir))


def face_embedder(config: Config, stack: ExitStack) -> FaceEmbedder | None:
    """The face identity model that keeps one person per track, or None when
    `tracking.identity_distance` is 0."""
    if not config.tracking.identity_distance:
        return None
    # One thread: it runs on the processing thread, beside detection on the other core.
    return stack.enter_context(create_face_embedder(config.models_dir, threads=1))


def build_processor(
    config: Config,
    info: SourceInfo,
    estimator: Estimator,
    stack: ExitStack,
    embedder: FaceEmbedder | None = None,
    region: tuple[float, float, float, float] | None = None,
) -> FrameProcessor:
    """A source's own detector, face checker, tracker and smoothing around `estimator` (its
    own, or a batcher shared with other sources) and `embedder` (shared, or else its own when
    identity checks are on), for the faces in `region` (None: all); the models it opens close
    with `stack`."""
    detector = stack.enter_context(create_detector(config.detector, info.width, config.models_dir))
    checker = face_checker(config, stack)
    embedder = embedder or face_embedder(config, stack)
    analyzer = FaceAnalyzer(detector, estimator, checker, embedder)
    return FrameProcessor(analyzer, config.tracking, info.fps, region)


def stream_start(
    camera: str,
    source: VideoSource,
    estimator: str,
    node: str | None = None,
    moved_from: str | None = None,
) -> StreamStart:
    """What the sinks learn of an opened `source` as `camera` starts (on cluster `node`, moved
    there from `moved_from`): a new incarnation id (UTC start and a random tag: unique
    across restarts, even within a second)."""
    file_path = source.file_path
    started = time.time()
    run = time.strftime(UTC_STAMP, time.gmtime(started)) + "-" + secrets.token_hex(3)
    shown = str(file_path.resolve()) if file_path is not None else source.info.source_id
    return StreamStart(camera, run, source.info, shown, estimator, started, node, moved_from)
