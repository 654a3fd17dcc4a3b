"""Hand-off buffers between the capture thread and the pipeline.

Two strategies, one interface (`FrameBuffer`):

- `LatestFrameBuffer` for live sources: newest frame wins, so latency stays at
  one frame however slow the consumer is; replaced frames are counted in `dropped`.
- `BlockingBuffer` for files: lossless, the producer waits while the buffer is full.

Both end with `END_OF_STREAM`, which is stored as a flag rather than a queued
item: it never blocks the producer, is never dropped, and is handed out after
every item put before it. Once the end has been reached, `get` keeps returning
`END_OF_STREAM` and further puts are ignored.

Timeout contract: `get(timeout)` raises `Empty` (the standard `queue.Empty`)
when nothing arrives in time, like `queue.Queue.get`.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from queue import Empty
from typing import Final, Generic, Protocol, TypeVar

__all__ = [
    "END_OF_STREAM",
    "BlockingBuffer",
    "Empty",
    "FrameBuffer",
    "LatestFrameBuffer",
    "make_buffer",
]

T = TypeVar("T")

# How often a producer blocked on a full BlockingBuffer looks at the stop event.
STOP_POLL_S = 0.05


class _EndOfStream(enum.Enum):
    """Type of the END_OF_STREAM sentinel; compare with `is`.

    A one-member enum so that `item is END_OF_STREAM` narrows `T | _EndOfStream` to `T` for mypy.
    """

    END_OF_STREAM = "END_OF_STREAM"

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM: Final = _EndOfStream.END_OF_STREAM


class FrameBuffer(Protocol[T]):
    """What the pipeline needs from a buffer, whichever strategy is behind it."""

    @property
    def dropped(self) -> int:
        """Items discarded to make room for newer ones (always 0 when lossless)."""
        ...

    def put(self, item: T | _EndOfStream, timeout: float | None = None) -> bool:
        """Hand over `item`; False when it was not taken (stopped, timed out or ended)."""
        ...

    def get(self, timeout: float | None = None) -> T | _EndOfStream:
        """Next item or END_OF_STREAM; raises `Empty` after `timeout` seconds."""
        ...

    def __len__(self) -> int:
        """Items waiting, not counting END_OF_STREAM."""
        ...


class LatestFrameBuffer(Generic[T]):
    """Single slot for live sources: `put` never blocks and replaces the waiting item."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slot: deque[T] = deque(maxlen=1)
        self._ended = False
        self._dropped = 0

    @property
    def dropped(self) -> int:
        return self._dropped

    def put(self, item: T | _EndOfStream, timeout: float | None = None) -> bool:
        """Store `item`, dropping the one still waiting; `timeout` is unused (never blocks)."""
        with self._cond:
            if self._ended:
                return False
            if item is END_OF_STREAM:
                # Kept apart from the slot so the last frame is still delivered first.
                self._ended = True
            else:
                if self._slot:
                    self._dropped += 1
                self._slot.append(item)  # maxlen=1: replaces the waiting item
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | _EndOfStream:
        with self._cond:
            if not self._cond.wait_for(lambda: self._slot or self._ended, timeout):
                raise Empty
            if not self._slot:
                return END_OF_STREAM
            return self._slot.popleft()

    def __len__(self) -> int:
        return len(self._slot)


class BlockingBuffer(Generic[T]):
    """Bounded FIFO for files: lossless, `put` waits for room.

    A blocked `put` gives up as soon as `stop_event` is set, so a producer never
    hangs on a consumer that has stopped reading.
    """

    def __init__(self, maxsize: int, stop_event: threading.Event | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"BlockingBuffer maxsize must be at least 1, but got {maxsize}")
        self.maxsize = maxsize
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._ended = False

    @property
    def dropped(self) -> int:
        return 0

    def put(self, item: T | _EndOfStream, timeout: float | None = None) -> bool:
        """Append `item`, waiting up to `timeout` seconds (None: until room or stop) while full.

        END_OF_STREAM never waits: it is a flag, not a slot.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._ended:
                return False
            if item is END_OF_STREAM:
                self._ended = True
                self._cond.notify_all()
                return True
            while len(self._items) >= self.maxsize:
                if self.stop_event.is_set():
                    return False
                wait = STOP_POLL_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                self._cond.wait(wait)
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | _EndOfStream:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._ended, timeout):
                raise Empty
            if not self._items:
                return END_OF_STREAM
            item = self._items.popleft()
            self._cond.notify_all()  # wakes a producer waiting for room
            return item

    def __len__(self) -> int:
        return len(self._items)


def make_buffer(
    is_file: bool, maxsize: int, stop_event: threading.Event | None = None
) -> FrameBuffer:
    """Lossless `BlockingBuffer` for files, `LatestFrameBuffer` for live sources.

    `maxsize` and `stop_event` only matter for files: a live buffer holds one item
    and never blocks.
    """
    if is_file:
        return BlockingBuffer(maxsize, stop_event)
    return LatestFrameBuffer()
