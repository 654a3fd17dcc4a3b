"""`agestream run` on a video or camera: the threaded stages (stream.stages) feeding the run's
sinks on the calling thread: the file outputs, a progress bar, the summary and the window.

The calling (main) thread owns the sinks so that the window works on every platform and
Ctrl-C lands where the outputs are finalized.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
from collections import deque
from contextlib import ExitStack
from pathlib import Path

import cv2
from tqdm import tqdm

from estimators import create_estimator
from stream.config import Config, OutputConfig
from stream.drain import (
    BaseSink,
    HookSink,
    ResultHook,
    Sink,
    close_sinks,
    delivered,
    drain,
    start_sinks,
)
from stream.outputs import check_output_paths
from stream.overlay import Drawing, font_scale
from stream.sinks import RunOutputs
from stream.sources import SourceEvent, VideoSource
from stream.stages import (
    RunSummary,
    build_processor,
    build_stages,
    describe,
    make_source,
    stop_stages,
    stream_start,
)
from stream.types import AnnotatedFrame, SourceInfo
from stream.window import Snapshots, WindowSink, has_display

log = logging.getLogger(__name__)


def output_paths(output: OutputConfig) -> dict[str, Path]:
    """The run's output files by what they are (standard output, "-", is no file)."""
    named = {"video": output.video, "JSON lines file": output.json, "tracks CSV": output.tracks}
    return {what: Path(path) for what, path in named.items() if path and path != "-"}


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


class WindowOutput(BaseSink):
    """The run's window as a sink: closing it (q, Esc, the close button) sets `stop`."""

    interactive = True

    def __init__(self, window: WindowSink, stop: threading.Event) -> None:
        self._window = window
        self._stop = stop

    def frame(self, frame: AnnotatedFrame) -> None:
        result = frame.result
        if not self._window.show(frame.image, result.frame.index, result.t_ms):
            log.info("window closed: stopping")
            self._stop.set()

    def close(self) -> None:
        self._window.close()


class ProgressOutput(BaseSink):
    """A progress bar on the terminal for file sources (none when it is not a terminal)."""

    def __init__(self, total: int | None, shown: bool) -> None:
        self._bar = tqdm(total=total, unit="frame", disable=None if shown else True, leave=False)

    def frame(self, frame: AnnotatedFrame) -> None:
        self._bar.update()

    def close(self) -> None:
        self._bar.close()


class SummaryOutput(BaseSink):
    """Counts the frames and faces that reached the outputs into the run's summary."""

    def __init__(self, summary: RunSummary) -> None:
        self._summary = summary

    def frame(self, frame: AnnotatedFrame) -> None:
        self._summary.count(frame.result)


def open_run_sinks(
    config: Config, source: VideoSource, summary: RunSummary, stack: ExitStack
) -> tuple[list[Sink], float]:
    """`run`'s sinks, closed with `stack`, and the font scale for where labels are seen: in
    the window when there is one."""
    info, output = source.info, config.output
    sinks: list[Sink] = []
    stack.callback(close_sinks, sinks, summary.outputs)
    sinks.append(RunOutputs(output, info.width, info.height, info.fps))
    total = info.frame_count
    if total is not None and output.max_frames is not None:
        total = min(total, output.max_frames)
    sinks += [ProgressOutput(total, info.is_file), SummaryOutput(summary)]
    window = _open_window(output, info, source.stop_event)
    if window is not None:
        sinks.append(WindowOutput(window, source.stop_event))
    return sinks, font_scale(info.width, info.height, window.shown if window else 1.0)


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
        sinks, scale = open_run_sinks(config, source, summary, stack)
        if on_result is not None:
            sinks.insert(0, HookSink(on_result))
        start_sinks(sinks, stream_start(info.source_id, source, config.estimator.name))
        drawing = Drawing(scale, hud=config.output.hud, blur=config.output.blur)
        stages = build_stages(
            processor, source, config.source.queue_size, source.stop_event, drawing
        )
        summary.source_id = info.source_id
        stack.callback(stop_stages, stages, summary, source)
        # Everything loaded so far (frameworks, models) lives for the whole run: keep it out of
        # the garbage collector's full passes, which otherwise rescan it again and again.
        gc.freeze()
        for stage in stages.threads:
            stage.start()
        items = delivered(stages, events)
        ended = drain(items, sinks, source.stop_event, config.output.max_frames)
        stages.raise_error()
        if ended and info.is_file and not source.stop_event.is_set():
            source.raise_if_incomplete()
