"""Limits that keep slow or flooding clients from exhausting `agestream serve`'s web server: a
cap on open connections where the longest-idle one makes room for a newcomer, and its error
logs rate-limited to one line per kind."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

log = logging.getLogger(__name__)

# How often one kind of server error is logged; repeats in between are counted, not logged.
LOG_EVERY_S = 10.0
_BUSY_BODY = b'{"error": "too many connections busy: try again shortly"}\n'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Busy(asyncio.Protocol):
    """Answers 503 and hangs up: every connection is busy with a request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY_RESPONSE)  # type: ignore[attr-defined]
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, passed every event, so that the cap knows the
    connection from its accept (before aiohttp does) to its loss."""

    def __init__(self, cap: ConnectionCap, handler: asyncio.Protocol) -> None:
        self.cap, self.handler = cap, handler
        self.transport: asyncio.BaseTransport | None = None
        self.evicted = False  # before asyncio made the connection: close it once it does

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.handler.connection_made(transport)
        if self.evicted:
            transport.close()

    def close(self) -> None:
        self.evicted = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cap.open.pop(self, None)
        self.handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class ConnectionCap:
    """A protocol factory in front of aiohttp's `web.Server` that keeps at most `limit`
    connections open. When full, the oldest connection with no request in progress (a client
    that never finished its headers, or an idle keep-alive one) is closed to make room; when
    every one is busy, the newcomer gets a 503. `busy` holds the handlers (aiohttp's
    protocols) with a request in progress; the app keeps it (stream.web)."""

    def __init__(
        self, server: web.Server, limit: int, busy: set[object], limiter: RateLimiter
    ) -> None:
        if limit < 1:
            raise ValueError(f"connection limit must be at least 1, got {limit}")
        self.server, self.limit, self.busy, self.limiter = server, limit, busy, limiter
        self.open: dict[_Counted, None] = {}  # oldest first

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.open) >= self.limit and not self._make_room():
            self.limiter.log(f"refused a connection: all {self.limit} connections are busy")
            return _Busy()
        counted = _Counted(self, self.server())
        self.open[counted] = None
        return counted

    def _make_room(self) -> bool:
        """Close the longest idle connection; False when there is none."""
        # In a burst, asyncio makes the accepted connections only after creating all their
        # protocols: the oldest idle may not be made yet.
        for counted in self.open:
            if counted.handler not in self.busy:
                del self.open[counted]
                counted.close()
                self.limiter.log(f"{self.limit} connections open: closed the longest idle one")
                return True
        return False


class RateLimiter:
    """Logs each message format at most once per `every_s` on one line (no traceback), with
    the count of those left out since the last."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to leave this one out, else how many like it were left out before it."""
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._left_out.pop(key, 0)

    def log(self, message: str, detail: str = "") -> None:
        """Log `message` (the kind) and `detail` (this case) as a warning, if allowed."""
        left_out = self.allow(message)
        if left_out is not None:
            suffix = f" ({left_out} more like it not logged)" if left_out else ""
            log.warning("%s%s%s", message, detail, suffix)

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter: rate-limits `record` and folds its traceback into one line."""
        left_out = self.allow(f"{record.name}:{record.msg}")
        if left_out is None:
            return False
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            detail = _one_line(error).replace("%", "%%")
            record.msg = f"{record.msg}: {type(error).__name__}" + (f": {detail}" if detail else "")
            record.exc_info, record.exc_text = None, None
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like it not logged)"
        return True

    def loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """An asyncio exception handler (accept failures, lost connections): one line."""
        error = context.get("exception")
        detail = "" if error is None else f": {type(error).__name__}: {_one_line(error)}"
        self.log(str(context.get("message") or "event loop error"), detail)


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."
