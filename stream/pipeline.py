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
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import cv2
from tqdm import tqdm

from detectors import create_detector
from estimators import create_estimator
from stream.analyzer import FaceAnalyzer
from stream.buffers import END_OF_STREAM, BlockingBuffer, Empty, FrameBuffer, make_buffer
from stream.config import Config
from stream.overlay import HudStats, annotate
from stream.processor import Detected, FrameProcessor
from stream.sinks import JsonLinesSink, TrackCsvSink, VideoFileSink, WindowSink, frame_record
from stream.smoothing import TrackSummary
from stream.sources import CaptureThread, SourceEvent, VideoSource
from stream.types import Frame, FrameResult, SourceInfo

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
    faces_estimated: int = 0
    dropped: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    source_fps: float = 0.0
    outputs: list[str] = field(default_factory=list)

    @property
    def processing_fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        text = (
            f"{self.source_id}: {self.frames} frames in {self.elapsed_s:.1f} s "
            f"({self.processing_fps:.1f} FPS processed, source {self.source_fps:.1f} FPS), "
            f"{self.faces} faces in {self.frames_with_faces} frames "
            f"({self.faces_estimated} estimated), {self.dropped} dropped"
        )
        if self.reconnects:
            text += f", {self.reconnects} reconnects"
        if self.skipped_frames:
            text += f", {self.skipped_frames} frames skipped after errors"
        return text + "".join(f"\n  wrote {output}" for output in self.outputs)


def media_time_ms(frame: Frame, info: SourceInfo, start: float) -> float:
    """Position in the video for files; time since the first frame for live sources."""
    if info.is_file:
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


def has_display() -> bool:
    return sys.platform != "linux" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


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

    Each item put into `results` is `(result, annotated image, ended track summaries)`;
    the last one before END_OF_STREAM is `(None, None, tracks still open)`.
    """

    def __init__(
        self,
        processor: FrameProcessor,
        inputs: FrameBuffer,
        results: BlockingBuffer,
        capture: CaptureThread,
        info: SourceInfo,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="processing", daemon=True)
        self.processor = processor
        self.inputs = inputs
        self.results = results
        self.capture = capture
        self.info = info
        self.stop = stop
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

    def _process(self, detected: Detected) -> tuple[FrameResult, list[TrackSummary]]:
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
                if not self.results.put((result, annotate(result, stats), ended)):
                    break
            self.results.put((None, None, self.processor.finish()))
        except Exception as error:  # re-raised on the main thread
            self.error = error
        finally:
            self.results.put(END_OF_STREAM)


def _write_remaining_tracks(
    results: BlockingBuffer, processing: ProcessingThread, tracks_sink: TrackCsvSink
) -> None:
    """After a stop, give every track its CSV row: those ended in results never read, then
    those still open. A no-op after a normal end, where the stream delivered them all."""
    while True:
        try:
            item = results.get(timeout=0)
        except Empty:
            break
        if item is END_OF_STREAM:
            break
        tracks_sink.write_all(item[2])
    # The processor is only touched once its thread is gone: it has no locks.
    if not processing.is_alive():
        tracks_sink.write_all(processing.processor.finish())


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
        SourceError, ModelError, SinkError, ConfigError: fatal problems, one line each.
    """
    output = config.output
    events: deque[SourceEvent] = deque()  # appended by the capture thread
    if not isinstance(source_spec, VideoSource):
        source_spec = VideoSource(
            source_spec,
            open_timeout_ms=int(config.source.open_timeout_s * 1000),
            read_timeout_ms=int(config.source.read_timeout_s * 1000),
            rtsp_transport=config.source.rtsp_transport,
        )
    source_spec.on_event = events.append
    stop = source_spec.stop_event
    with ExitStack() as stack:
        # The stages are the parallelism; OpenCV's own worker pool would only oversubscribe
        # the cores they already keep busy. Restored when the run ends.
        stack.callback(cv2.setNumThreads, cv2.getNumThreads())
        cv2.setNumThreads(1)
        source = stack.enter_context(source_spec.open())
        info = source.info
        log.info(
            "source %s: %dx%d at %.2f FPS, %s",
            info.source_id,
            info.width,
            info.height,
            info.fps,
            f"file of {info.frame_count} frames" if info.is_file else "live (newest frame wins)",
        )
        detector = stack.enter_context(
            create_detector(config.detector, info.width, config.models_dir)
        )
        analyzer = FaceAnalyzer(detector, create_estimator(config.estimator, config.models_dir))
        processor = FrameProcessor(analyzer, config.tracking, info.fps)

        video = json_sink = tracks_sink = window = None
        if output.video:
            video = stack.enter_context(
                VideoFileSink(output.video, info.width, info.height, info.fps)
            )
        if output.json:
            json_sink = stack.enter_context(JsonLinesSink(output.json))
        if output.tracks:
            tracks_sink = stack.enter_context(TrackCsvSink(output.tracks))
        if output.window:
            if has_display():
                window = stack.enter_context(WindowSink(f"agestream: {info.source_id}"))
            else:
                log.warning(
                    "no display found: running without a window (use --no-window to silence)"
                )

        frames = make_buffer(info.is_file, config.source.queue_size, stop)
        results = BlockingBuffer(RESULT_QUEUE_SIZE, stop)
        capture = CaptureThread(source, frames, stop)
        detection, processing_inputs = None, frames
        if info.is_file:
            processing_inputs = BlockingBuffer(DETECTED_QUEUE_SIZE, stop)
            detection = DetectionThread(processor, frames, processing_inputs, stop)
        processing = ProcessingThread(processor, processing_inputs, results, capture, info, stop)
        stages = [stage for stage in (capture, detection, processing) if stage is not None]
        summary.source_id = info.source_id
        total = info.frame_count if info.is_file else None
        if total is not None and output.max_frames is not None:
            total = min(total, output.max_frames)
        progress = stack.enter_context(
            tqdm(total=total, unit="frame", disable=None if info.is_file else True, leave=False)
        )

        def finish() -> None:
            stop.set()
            for stage in reversed(stages):
                stage.join(JOIN_TIMEOUT_S)
            summary.elapsed_s = time.monotonic() - processing.started_at
            summary.dropped = capture.drops
            summary.reconnects = source.reconnects
            summary.skipped_frames = processing.skipped_frames
            summary.source_fps = processing.source_fps()
            summary.faces_estimated = processor.faces_estimated
            if tracks_sink is not None:
                _write_remaining_tracks(results, processing, tracks_sink)
            for sink, count, unit in (
                (video, video and video.frames_written, "frames"),
                (json_sink, json_sink and json_sink.lines_written, "lines"),
                (tracks_sink, tracks_sink and tracks_sink.rows_written, "tracks"),
            ):
                if sink is not None:
                    summary.outputs.append(f"{sink.path} ({count} {unit})")

        stack.callback(finish)
        # Everything loaded so far (frameworks, models) lives for the whole run: keep it out of
        # the garbage collector's full passes, which otherwise rescan it again and again.
        gc.freeze()
        for stage in stages:
            stage.start()

        def write_events() -> None:
            while events:
                event = events.popleft()
                if json_sink is not None:
                    json_sink.write(event_record(event, processing.first_timestamp))

        while True:
            try:
                item = results.get(timeout=POLL_S)
            except Empty:
                write_events()  # a reconnecting live source delivers no frames meanwhile
                continue
            write_events()
            if item is END_OF_STREAM:
                break
            result, image, ended = item
            if tracks_sink is not None:
                tracks_sink.write_all(ended)
            if result is None:
                continue
            if on_result is not None:
                on_result(result, time.monotonic())
            with _signals_deferred():
                summary.frames += 1
                summary.faces += len(result.faces)
                summary.frames_with_faces += bool(len(result.faces))
                if video is not None:
                    video.write(image)
                if json_sink is not None:
                    json_sink.write(frame_record(result))
            progress.update()
            if window is not None and not window.show(image):
                log.info("window closed: stopping")
                break
            if output.max_frames is not None and summary.frames >= output.max_frames:
                break
        for stage in reversed(stages):
            if stage.error is not None:
                raise stage.error
