"""One seam for results: the `Sink` protocol every consumer of a stream's results implements
(files, window, progress, the live page's state, visits store, events out), and the drain
loop that hands them, in order, what a stream delivers: `run`, `serve` and photos share it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from stream.buffers import END_OF_STREAM, Empty
from stream.sources import SourceEvent
from stream.stages import POLL_S, Stages
from stream.types import AnnotatedFrame, FrameResult, StreamStart

# A source event and its time (ms) on the frames' clock.
TimedEvent = tuple[SourceEvent, float]


class Sink(Protocol):
    """A consumer of one stream's results. Called on one thread, in this order: `start` once,
    then `source_event`s, `people_left` and `frame`s as they come, `close` once however the
    stream ends (it finalizes what was written; OutputError when that failed), then
    `report`: a line per output it wrote ("wrote PATH (N frames)").

    An `interactive` sink (the window) may wait for the user; it gets each frame after the
    others, outside the part that holds Ctrl-C back.
    """

    interactive: bool

    def start(self, stream: StreamStart) -> None: ...
    def frame(self, frame: AnnotatedFrame) -> None: ...
    def source_event(self, event: SourceEvent, t_ms: float) -> None: ...
    def people_left(self, people: tuple[int, ...], t_ms: float) -> None: ...
    def close(self) -> None: ...
    def report(self) -> list[str]: ...


class BaseSink:
    """A sink that ignores everything: subclasses implement only what they consume."""

    interactive = False

    def start(self, stream: StreamStart) -> None:
        pass

    def frame(self, frame: AnnotatedFrame) -> None:
        pass

    def source_event(self, event: SourceEvent, t_ms: float) -> None:
        pass

    def people_left(self, people: tuple[int, ...], t_ms: float) -> None:
        pass

    def close(self) -> None:
        pass

    def report(self) -> list[str]:
        return []


# Called with each result and time.monotonic() when its annotated frame reaches the sinks:
# `agestream bench` measures latency with it.
ResultHook = Callable[[FrameResult, float], None]


class HookSink(BaseSink):
    """Calls `hook` with each frame's result as it reaches the sinks."""

    def __init__(self, hook: ResultHook) -> None:
        self._hook = hook

    def frame(self, frame: AnnotatedFrame) -> None:
        self._hook(frame.result, time.monotonic())


def delivered(stages: Stages, events: deque[SourceEvent]) -> Iterator[AnnotatedFrame | TimedEvent]:
    """What a stream's stages deliver, in order, until END_OF_STREAM: the source's events (from
    `events`, which its capture thread appends to) and the annotated frames."""
    while True:
        try:
            item = stages.results.get(timeout=POLL_S)
        except Empty:
            item = None  # a reconnecting live source delivers no frames meanwhile
        start = stages.processing.first_timestamp
        while events:
            event = events.popleft()
            yield event, (event.timestamp - start) * 1000.0 if start is not None else 0.0
        if item is END_OF_STREAM:
            return
        if item is not None:
            yield item


def drain(
    items: Iterable[AnnotatedFrame | TimedEvent],
    sinks: Sequence[Sink],
    stop: threading.Event,
    max_frames: int | None = None,
) -> bool:
    """Hand every item to every sink; True when the items ran out (the stream ended), False
    when `stop` was set (a window closed, the stream was stopped) or after `max_frames`."""
    frames = 0
    for item in items:
        if isinstance(item, AnnotatedFrame):
            # Every sink gets a frame or none does: the video and the JSON lines stay alike.
            with signals_deferred():
                for sink in sinks:
                    if not sink.interactive:
                        _hand_frame(sink, item)
            for sink in sinks:
                if sink.interactive:
                    _hand_frame(sink, item)
            frames += 1
        else:
            for sink in sinks:
                sink.source_event(*item)
        if stop.is_set() or (max_frames is not None and frames >= max_frames):
            return False
    return True


def _hand_frame(sink: Sink, frame: AnnotatedFrame) -> None:
    if frame.left:
        sink.people_left(frame.left, frame.result.t_ms)
    sink.frame(frame)


def start_sinks(sinks: Sequence[Sink], stream: StreamStart) -> None:
    for sink in sinks:
        sink.start(stream)


def close_sinks(sinks: Sequence[Sink], report: list[str]) -> None:
    """Close every sink, last opened first, each whatever happens to the others; their report
    lines go into `report`, whole or not. The first failure is raised once all are closed."""
    failures: list[Exception] = []
    for sink in reversed(sinks):
        try:
            sink.close()
        except Exception as error:  # noqa: BLE001 - every sink gets its chance to finish
            failures.append(error)
    for sink in sinks:
        report.extend(sink.report())
    if failures:
        raise failures[0]


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, so that a frame reaches every output or none.

    Swaps the Python-level handlers (a signal mask would not do: the kernel may hand
    the signal to another thread, and Python still runs the handler here).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set, and only run, on the main thread
        return
    caught: list[int] = []
    previous: dict[int, Any] = {
        signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)
    }
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
