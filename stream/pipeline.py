"""The threaded run: capture thread → processing thread → sinks on the calling thread.

The calling (main) thread owns the sinks so that the window works on every
platform and Ctrl-C lands where the outputs are finalized. One stop Event ends
every stage; every blocking call has a timeout; END_OF_STREAM always reaches
the end of each buffer, so no stage can wait forever on another.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from detectors import create_detector
from estimators import create_estimator
from stream.analyzer import FaceAnalyzer
from stream.buffers import END_OF_STREAM, BlockingBuffer, Empty, make_buffer
from stream.config import Config
from stream.overlay import HudStats, annotate
from stream.sinks import JsonLinesSink, VideoFileSink, WindowSink, frame_record
from stream.sources import CaptureThread, VideoSource
from stream.types import Estimates, Faces, Frame, FrameResult, SourceInfo

log = logging.getLogger(__name__)

POLL_S = 0.1
JOIN_TIMEOUT_S = 2.0
RESULT_QUEUE_SIZE = 4


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
    dropped: int = 0
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
            f"{self.faces} faces in {self.frames_with_faces} frames, {self.dropped} dropped"
        )
        if self.skipped_frames:
            text += f", {self.skipped_frames} frames skipped after errors"
        return text + "".join(f"\n  wrote {output}" for output in self.outputs)


def media_time_ms(frame: Frame, info: SourceInfo, start: float) -> float:
    """Position in the video for files; time since the first frame for live sources."""
    if info.is_file:
        return frame.index * 1000.0 / info.fps
    return (frame.timestamp - start) * 1000.0


def has_display() -> bool:
    return sys.platform != "linux" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


class ProcessingThread(threading.Thread):
    """Takes frames, analyzes and annotates them, hands (result, image) to the sinks."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        frames,
        results: BlockingBuffer,
        capture: CaptureThread,
        info: SourceInfo,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="processing", daemon=True)
        self.analyzer = analyzer
        self.frames = frames
        self.results = results
        self.capture = capture
        self.info = info
        self.stop = stop
        self.meter = RateMeter()
        self.started_at = time.monotonic()
        self.skipped_frames = 0
        self.error: Exception | None = None

    def source_fps(self) -> float:
        if self.info.is_file:
            return self.info.fps
        elapsed = time.monotonic() - self.started_at
        return self.capture.frames_read / elapsed if elapsed > 0 else 0.0

    def _analyze(self, frame: Frame) -> FrameResult:
        try:
            faces, estimates, timings = self.analyzer.analyze(frame.image)
        except Exception as error:  # one bad frame must not end the run or lose a file's frame
            self.skipped_frames += 1
            log.warning("frame %d: analysis skipped: %s", frame.index, error)
            empty = np.zeros((0,), np.float32)
            return FrameResult(frame, Faces.empty(), Estimates(empty, empty, empty))
        return FrameResult(frame, faces, estimates, timings_ms=timings)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    frame = self.frames.get(timeout=POLL_S)
                except Empty:
                    continue
                if frame is END_OF_STREAM:
                    break
                result = self._analyze(frame)
                self.meter.tick(time.monotonic())
                stats = HudStats(self.meter.rate, self.source_fps(), self.capture.drops)
                if not self.results.put((result, annotate(result, stats))):
                    break
        except Exception as error:  # re-raised on the main thread
            self.error = error
        finally:
            self.results.put(END_OF_STREAM)


def run(config: Config, source_spec: str, summary: RunSummary) -> None:
    """Run the whole pipeline on one source, filling `summary` as it goes.

    Outputs are finalized and `summary` completed however the run ends (end of
    stream, max_frames, window closed, an error or Ctrl-C), so the caller can
    always report it.

    Raises:
        SourceError, ModelError, SinkError, ConfigError: fatal problems, one line each.
    """
    output = config.output
    stop = threading.Event()
    with ExitStack() as stack:
        source = stack.enter_context(
            VideoSource(
                source_spec,
                open_timeout_ms=int(config.source.open_timeout_s * 1000),
                read_timeout_ms=int(config.source.read_timeout_s * 1000),
            ).open()
        )
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

        video = json_sink = window = None
        if output.video:
            video = stack.enter_context(
                VideoFileSink(output.video, info.width, info.height, info.fps)
            )
        if output.json:
            json_sink = stack.enter_context(JsonLinesSink(output.json))
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
        processing = ProcessingThread(analyzer, frames, results, capture, info, stop)
        summary.source_id = info.source_id
        total = info.frame_count if info.is_file else None
        if total is not None and output.max_frames is not None:
            total = min(total, output.max_frames)
        progress = stack.enter_context(
            tqdm(total=total, unit="frame", disable=None if info.is_file else True, leave=False)
        )

        def finish() -> None:
            stop.set()
            processing.join(JOIN_TIMEOUT_S)
            capture.join(JOIN_TIMEOUT_S)
            summary.elapsed_s = time.monotonic() - processing.started_at
            summary.dropped = capture.drops
            summary.skipped_frames = processing.skipped_frames
            summary.source_fps = processing.source_fps()
            for sink, unit in ((video, "frames"), (json_sink, "lines")):
                if sink is not None:
                    count = sink.frames_written if unit == "frames" else sink.lines_written
                    summary.outputs.append(f"{sink.path} ({count} {unit})")

        stack.callback(finish)
        capture.start()
        processing.start()
        first_timestamp: float | None = None
        while True:
            try:
                item = results.get(timeout=POLL_S)
            except Empty:
                continue
            if item is END_OF_STREAM:
                break
            result, image = item
            if first_timestamp is None:
                first_timestamp = result.frame.timestamp
            summary.frames += 1
            summary.faces += len(result.faces)
            summary.frames_with_faces += bool(len(result.faces))
            if video is not None:
                video.write(image)
            if json_sink is not None:
                json_sink.write(
                    frame_record(result, media_time_ms(result.frame, info, first_timestamp))
                )
            progress.update()
            if window is not None and not window.show(image):
                log.info("window closed: stopping")
                break
            if output.max_frames is not None and summary.frames >= output.max_frames:
                break
        for stage in (processing, capture):
            if stage.error is not None:
                raise stage.error
