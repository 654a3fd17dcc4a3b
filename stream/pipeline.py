"""The threaded run: capture thread → processing thread → sinks on the calling thread.

The calling (main) thread owns the sinks so that the window works on every
platform and Ctrl-C lands where the outputs are finalized. One stop Event ends
every stage; every blocking call has a timeout; END_OF_STREAM always reaches
the end of each buffer, so no stage can wait forever on another.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from tqdm import tqdm

from detectors import Detector, create_detector
from estimators import Estimator, create_estimator
from stream.analyzer import FACE_CHECK_SIZE, FaceAnalyzer, detector_config_for_checks
from stream.buffers import END_OF_STREAM, BlockingBuffer, Empty, FrameBuffer, make_buffer
from stream.config import Config, OutputConfig, package_version
from stream.face_id import FaceEmbedder, create_face_embedder
from stream.outputs import check_output_paths
from stream.overlay import HudStats, annotate, font_scale
from stream.processor import Detected, FrameProcessor
from stream.sinks import RunOutputs
from stream.sources import CaptureThread, SourceEvent, VideoSource
from stream.types import Frame, FrameResult, SourceInfo
from stream.window import Snapshots, WindowSink, has_display

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


def event_record(event: SourceEvent, start: float | None) -> dict:
    """The JSON-lines record of a source event; `t_ms` on the live frames' clock."""
    record = {
        "event": event.kind,
        "t_ms": round((event.timestamp - start) * 1000.0, 3) if start is not None else 0.0,
        "attempt": event.attempt,
    }
    if event.down_s is not None:
        record["down_ms"] = round(event.down_s * 1000.0, 1)
    return record


def start_record(info: SourceInfo, file_path: Path | None, estimator: str) -> dict:
    """The JSON-lines file's first record: what was run on what (`agestream report` finds the
    video for its snapshots here)."""
    return {
        "event": "start",
        "t_ms": 0.0,
        "source": str(file_path.resolve()) if file_path is not None else info.source_id,
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 3),
        "is_file": info.is_file,
        "estimator": estimator,
        "agestream": package_version(),
    }


# Called on the calling thread with each result and time.monotonic() when its
# annotated frame reaches the sinks: `agestream bench` measures latency with it.
ResultHook = Callable[[FrameResult, float], None]


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, so that a frame is counted and written to
    every output or to none: the video and the JSON lines stay frame for frame alike.

    Swaps the Python-level handlers (a signal mask would not do: the kernel may hand
    the signal to another thread, and Python still runs the handler here).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set, and only run, on the main thread
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


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

    Each item put into `results` is `(result, annotated image, IDs of the tracks that
    ended with it)`; labels are drawn at font scale `scale`.
    """

    def __init__(
        self,
        processor: FrameProcessor,
        inputs: FrameBuffer,
        results: BlockingBuffer,
        capture: CaptureThread,
        info: SourceInfo,
        stop: threading.Event,
        scale: float,
    ) -> None:
        super().__init__(name="processing", daemon=True)
        self.processor = processor
        self.inputs = inputs
        self.results = results
        self.capture = capture
        self.info = info
        self.stop = stop
        self.scale = scale
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
                stats = HudStats(self.meter.rate, self.source_fps(), self.capture.drops)
                if not self.results.put((result, annotate(result, stats, self.scale), ended)):
                    break
        except Exception as error:  # re-raised on the main thread
            self.error = error
        finally:
            self.results.put(END_OF_STREAM)


def make_source(config: Config, source_spec: str | VideoSource) -> VideoSource:
    """The run's source: as given, or opened lazily from a CLI/config source argument."""
    if isinstance(source_spec, VideoSource):
        return source_spec
    return VideoSource(
        source_spec,
        open_timeout_ms=int(config.source.open_timeout_s * 1000),
        read_timeout_ms=int(config.source.read_timeout_s * 1000),
        rtsp_transport=config.source.rtsp_transport,
    )


def output_paths(output: OutputConfig) -> dict[str, Path]:
    """The run's output files by what they are (standard output, "-", is no file)."""
    named = {"video": output.video, "JSON lines file": output.json, "tracks CSV": output.tracks}
    return {what: Path(path) for what, path in named.items() if path and path != "-"}


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


def build_stages(
    processor: FrameProcessor,
    source: VideoSource,
    queue_size: int,
    stop: threading.Event,
    scale: float,
) -> Stages:
    info = source.info
    frames = make_buffer(info.is_file, queue_size, stop)
    results = BlockingBuffer(RESULT_QUEUE_SIZE, stop)
    capture = CaptureThread(source, frames, stop)
    detection, processing_inputs = None, frames
    if info.is_file:
        processing_inputs = BlockingBuffer(DETECTED_QUEUE_SIZE, stop)
        detection = DetectionThread(processor, frames, processing_inputs, stop)
    processing = ProcessingThread(processor, processing_inputs, results, capture, info, stop, scale)
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
) -> FrameProcessor:
    """A source's own detector, face checker, tracker and smoothing around `estimator` (its
    own, or a batcher shared with other sources) and `embedder` (shared, or else its own when
    identity checks are on); the models it opens close with `stack`."""
    detector = stack.enter_context(create_detector(config.detector, info.width, config.models_dir))
    checker = face_checker(config, stack)
    embedder = embedder or face_embedder(config, stack)
    analyzer = FaceAnalyzer(detector, estimator, checker, embedder)
    return FrameProcessor(analyzer, config.tracking, info.fps)


def _snapshots(output: OutputConfig, info: SourceInfo) -> Snapshots:
    """Snapshots go beside the run's first output file, else into the current folder, named
    after the source."""
    paths = list(output_paths(output).values())
    folder = paths[0].absolute().parent if paths else Path.cwd()
    name = Path(info.source_id).stem if info.is_file else info.source_id
    return Snapshots(folder, re.sub(r"[^\w.-]+", "_", name).strip("_") or "source")


def _open_window(
    output: OutputConfig, info: SourceInfo, stop: threading.Event
) -> WindowSink | None:
    if not output.window:
        return None
    if not has_display():
        log.warning("no display found: running without a window (use --no-window to silence)")
        return None
    # A file plays at its own pace; a live source is shown as it comes.
    pace = output.pace and info.is_file
    size = (info.width, info.height)
    return WindowSink(f"agestream: {info.source_id}", size, pace, _snapshots(output, info), stop)


def _drain(
    stages: Stages,
    outputs: RunOutputs,
    window: WindowSink | None,
    events: deque[SourceEvent],
    summary: RunSummary,
    max_frames: int | None,
    on_result: ResultHook | None,
) -> bool:
    """The main thread's loop: results to the outputs and the window; True when the stream
    itself ended (not max_frames, the window or a stop)."""
    progress_total = stages.capture.source.info.frame_count
    if progress_total is not None and max_frames is not None:
        progress_total = min(progress_total, max_frames)
    is_file = stages.capture.source.info.is_file
    with tqdm(
        total=progress_total, unit="frame", disable=None if is_file else True, leave=False
    ) as progress:
        while True:
            try:
                item = stages.results.get(timeout=POLL_S)
            except Empty:
                write_events(events, outputs, stages.processing.first_timestamp)
                continue  # a reconnecting live source delivers no frames meanwhile
            write_events(events, outputs, stages.processing.first_timestamp)
            if item is END_OF_STREAM:
                return True
            result, image, ended = item
            outputs.tracks_ended(ended)
            if on_result is not None:
                on_result(result, time.monotonic())
            with _signals_deferred():
                outputs.write(result, image)
                summary.count(result)
            progress.update()
            if window is not None and not window.show(image, result.frame.index, result.t_ms):
                log.info("window closed: stopping")
                return False
            if max_frames is not None and summary.frames >= max_frames:
                return False


def write_events(events: deque[SourceEvent], outputs: RunOutputs, start: float | None) -> None:
    while events:
        outputs.write_event(event_record(events.popleft(), start))


def run(
    config: Config,
    source_spec: str | VideoSource,
    summary: RunSummary,
    on_result: ResultHook | None = None,
) -> None:
    """Run the whole pipeline on one source, filling `summary` as it goes.

    Outputs are finalized and `summary` completed however the run ends (end of
    stream, max_frames, window closed, an error or Ctrl-C), so the caller can
    always report it. `source_spec` may be an unopened `VideoSource` (bench and
    soak pass a `SimulatedLiveSource`); its stop event then ends the run.

    Raises:
        SourceError, ModelError, OutputError, ConfigError: fatal problems, one line each.
    """
    source = make_source(config, source_spec)
    check_output_paths(output_paths(config.output), source.file_path)
    events: deque[SourceEvent] = deque()  # appended by the capture thread
    source.on_event = events.append
    with ExitStack() as stack:
        # The stages are the parallelism; OpenCV's own worker pool would only oversubscribe
        # the cores they already keep busy. Restored when the run ends.
        stack.callback(cv2.setNumThreads, cv2.getNumThreads())
        cv2.setNumThreads(1)
        info = stack.enter_context(source.open()).info
        log.info("source %s: %s", info.source_id, describe(info))
        estimator = create_estimator(config.estimator, config.models_dir)
        processor = build_processor(config, info, estimator, stack)
        outputs = RunOutputs(config.output, info.width, info.height, info.fps)
        outputs.write_event(start_record(info, source.file_path, config.estimator.name))
        # Reported after the outputs close (callbacks unwind last-in first-out), so that a
        # file whose finishing failed is not reported as written.
        stack.callback(lambda: summary.outputs.extend(outputs.report()))
        stack.enter_context(outputs)
        window = _open_window(config.output, info, source.stop_event)
        if window is not None:
            stack.enter_context(window)
        # Labels sized for where they are seen: in the window when there is one.
        scale = font_scale(info.width, info.height, window.shown if window else 1.0)
        stages = build_stages(processor, source, config.source.queue_size, source.stop_event, scale)
        summary.source_id = info.source_id
        stack.callback(stop_stages, stages, summary, source)
        # Everything loaded so far (frameworks, models) lives for the whole run: keep it out of
        # the garbage collector's full passes, which otherwise rescan it again and again.
        gc.freeze()
        for stage in stages.threads:
            stage.start()
        ended = _drain(
            stages, outputs, window, events, summary, config.output.max_frames, on_result
        )
        for stage in reversed(stages.threads):
            if stage.error is not None:
                raise stage.error
        if ended and info.is_file and not source.stop_event.is_set():
            source.raise_if_incomplete()
