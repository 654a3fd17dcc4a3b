"""Native libraries' stderr (MediaPipe's glog, LiteRT, TensorFlow write to file descriptor 2
themselves) read through a pipe into agestream's logging: DEBUG (shown with -v), or WARNING
for the errors they report."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

native_log = logging.getLogger("native")

# glog/absl lines open with their severity letter and a timestamp: "E0000 00:00:…".
SEVERE_LINE = re.compile(r"^[EF]\d{4} ")
# A lost reader must not hold the exit; the pipe is drained in microseconds.
READER_JOIN_TIMEOUT_S = 1.0


def _forward(read_end: int) -> None:
    with open(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                level = logging.WARNING if SEVERE_LINE.match(line) else logging.DEBUG
                native_log.log(level, "%s", line)


def _real_stderr_fd() -> int | None:
    """2 when sys.stderr is the process's own file descriptor 2 (not a test's capture)."""
    try:
        sys.stderr.flush()
        return 2 if sys.stderr.fileno() == 2 else None
    except (AttributeError, OSError, ValueError):
        return None


def _swap_handler_streams(old: object, new: object) -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(new)


@contextlib.contextmanager
def native_stderr_to_logging() -> Iterator[None]:
    """Within the block, whatever native code writes to fd 2 becomes log records, while
    Python's own sys.stderr (and logging) still reach the terminal through a copy of fd 2.
    A no-op when stderr is not fd 2."""
    if _real_stderr_fd() is None:
        yield
        return
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    original = sys.stderr
    replacement = open(  # noqa: SIM115 - lives as long as the block
        terminal, "w", buffering=1, encoding=original.encoding, errors="backslashreplace"
    )
    sys.stderr = replacement
    _swap_handler_streams(original, replacement)
    reader = threading.Thread(target=_forward, args=(read_end,), name="native-stderr", daemon=True)
    reader.start()
    try:
        yield
    finally:
        # Restoring fd 2 closes the pipe's last write end, so the reader drains it and ends.
        os.dup2(terminal, 2)
        reader.join(READER_JOIN_TIMEOUT_S)
        replacement.flush()
        _swap_handler_streams(replacement, original)
        sys.stderr = original
        replacement.close()
