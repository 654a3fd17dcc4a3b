"""Video sources (webcams, network streams, files), the thread that reads them, and still images.

`VideoSource` opens a capture and fails fast with `SourceError` (a URL source built with
`wait_at_start` waits for its camera instead); `CaptureThread` reads it into a `FrameBuffer`
(lossless for files, newest-wins for live sources) and always ends the stream with
`END_OF_STREAM`. A URL source that stops delivering frames after a successful open reconnects
inside `VideoSource.read` with capped exponential backoff, forever, reporting `SourceEvent`s;
it inserts no placeholder frames, and files and webcams never reconnect. `read_image` checks a
still image's size in its header before decoding it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from stream.buffers import END_OF_STREAM, FrameBuffer
from stream.types import Frame, SourceInfo

__all__ = [
    "CaptureThread",
    "ReconnectPolicy",
    "SimulatedLiveSource",
    "SourceError",
    "SourceEvent",
    "SourceSpec",
    "VideoSource",
    "parse_source",
    "redact",
    "shrink",
]

log = logging.getLogger(__name__)

URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")

# Used when a capture reports no usable FPS (common for webcams and some streams).
FALLBACK_FPS = 30.0

# Frames larger than this per side (beyond 8K, no camera's) are downscaled to it.
MAX_FRAME_SIDE = 8192
# Still images with more pixels than this are skipped unread: 16384 x 16384, four times
# MAX_FRAME_SIDE's area and beyond the largest camera sensors (200 MP). Decoding one costs
# 0.8 GB for its pixels alone; a few hundred bytes of PNG can declare 10 gigapixels.
MAX_IMAGE_PIXELS = 16384 * 16384

# A file whose frame count is unknown ends after this many reads in a row fail; with a known
# count, the frames it still lists may all be tried.
UNDECODABLE_RUN_LIMIT = 50

# Longest the capture thread waits to hand over END_OF_STREAM; buffers never
# block on it, so this only bounds a misbehaving buffer.
END_PUT_TIMEOUT_S = 1.0

# How often a reconnect in progress looks at the stop event.
STOP_POLL_S = 0.05

# A source that stays down logs each of its first attempts, then one line a minute, so that an
# outage of hours stays readable.
LOGGED_ATTEMPTS = 5
QUIET_LOG_INTERVAL_S = 60.0

# A connect attempt still running this long after its open and read timeouts should have ended
# it is reported as hung.
HUNG_CONNECT_GRACE_S = 2.0

# Ports of rtsp(s):// URLs that name none.
RTSP_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322}

# FFmpeg reads its capture options from this variable when a capture opens.
FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
RTSP_TRANSPORTS = ("tcp", "udp")

# The environment is process-wide: captures opening at once must not see each other's options.
_ENV_LOCK = threading.Lock()

# Userinfo of a URL: everything between "scheme://" and the last "@" before the path.
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@")


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message names it and what to do."""


def shrink(image: np.ndarray, scale: float) -> np.ndarray:
    """`image` resized by `scale` < 1 (area averaging), each side at least 1 pixel."""
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, without decoding a pixel; None when it is
    not a header Pillow knows (OpenCV then has the last word)."""
    from PIL import (
        BmpImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    # The format classes themselves, not Image.open: that refuses sizes beyond Pillow's own
    # decompression-bomb limit (179 megapixels) before it tells them.
    readers = (
        JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile,
        WebPImagePlugin.WebPImageFile, BmpImagePlugin.BmpImageFile,
        TiffImagePlugin.TiffImageFile,
    )  # fmt: skip
    with path.open("rb") as file:
        for reader in readers:
            file.seek(0)
            try:
                return reader(file).size
            except Exception:  # another format, or a header Pillow cannot parse: try the next
                continue
    return None


def _decode(path: Path, name: str) -> np.ndarray | None:
    """The BGR pixels of an image whose size is within MAX_IMAGE_PIXELS (or unknown)."""
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error as error:
        reason = str(error).strip().splitlines()[-1]
        log.warning("skipping %s: OpenCV cannot decode it (%s)", name, reason)
        return None
    if image is None:
        log.warning("skipping %s: not a readable image", name)
    return image


def read_image(path: Path, name: str) -> np.ndarray | None:
    """The BGR image at `path` (called `name` in warnings), downscaled with a warning beyond
    MAX_FRAME_SIDE as a video's frames are (labelling it whole would exhaust memory); None,
    with a "skipping NAME: why" warning, when it is missing, larger than MAX_IMAGE_PIXELS
    (told by its header, before any pixel is decoded) or cannot be decoded."""
    try:
        size = image_size(path)
    except OSError as error:
        log.warning("skipping %s: cannot read it (%s)", name, error.strerror or error)
        return None
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        log.warning(
            "skipping %s: %dx%d pixels, more than the %d-megapixel limit for images",
            name, size[0], size[1], MAX_IMAGE_PIXELS // 1_000_000,
        )  # fmt: skip
        return None
    image = _decode(path, name)
    if image is None:
        return None
    height, width = image.shape[:2]
    if max(height, width) > MAX_FRAME_SIDE:
        image = shrink(image, MAX_FRAME_SIDE / max(height, width))
        log.warning(
            "%s is %dx%d, beyond any camera's size: using it downscaled to %dx%d",
            name, width, height, image.shape[1], image.shape[0],
        )  # fmt: skip
    return image


def redact(url: str) -> str:
    """`url` with any `user:password@` replaced by `***@`, safe for logs and errors."""
    return _USERINFO.sub(r"\1***@", url)


@dataclass(frozen=True)
class ReconnectPolicy:
    """Waits between reconnect attempts: `initial_s`, doubling up to `max_s`, forever.

    A camera that reboots or a flaky link comes back on its own; only stopping
    the run (Ctrl-C, SIGTERM) ends the attempts.
    """

    initial_s: float = 0.25
    max_s: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(
                f"ReconnectPolicy needs 0 < initial_s <= max_s, but got {self.initial_s}, "
                f"{self.max_s}"
            )

    def delay_s(self, attempt: int) -> float:
        """Wait before attempt number `attempt` (1-based)."""
        # Doubling stops at the cap: 2 ** attempt overflows a float after about an hour of
        # attempts every 4 s.
        doublings = min(attempt - 1, math.ceil(math.log2(self.max_s / self.initial_s)))
        return min(self.initial_s * 2**doublings, self.max_s)


@dataclass(frozen=True)
class SourceEvent:
    """Something that happened to a live source, for the log and the JSON lines.

    Attributes:
        kind: "reconnecting" (before each attempt) or "reconnected" (also when a source that
            was down at start, see `VideoSource`'s `wait_at_start`, first connects).
        timestamp: time.monotonic() when it happened.
        attempt: 1 for the first attempt after a loss (or after the failed first connect),
            counting up until it succeeds.
        down_s: for "reconnected", seconds since the loss was noticed (or since `open` began);
            else None.
    """

    kind: Literal["reconnecting", "reconnected"]
    timestamp: float
    attempt: int
    down_s: float | None = None


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source argument.

    Attributes:
        kind: "webcam", "url" or "file".
        target: what cv2.VideoCapture opens: camera index, URL or file path.
        source_id: name for logs and `Frame.source_id`, credentials redacted.
    """

    kind: Literal["webcam", "url", "file"]
    target: int | str
    source_id: str


def parse_source(spec: str | int) -> SourceSpec:
    """Turn a CLI/config source into a `SourceSpec`.

    An int or a string of digits is a webcam index, rtsp(s):// and http(s):// are
    stream URLs (an http(s) URL of a video file turns out finite when opened), a file://
    URL or anything else is a video file that must exist.

    Raises:
        SourceError: the file does not exist or is a directory.
    """
    if isinstance(spec, int) or spec.strip().isdigit():
        index = int(spec)
        return SourceSpec("webcam", index, f"webcam:{index}")
    if spec.lower().startswith(URL_SCHEMES):
        return SourceSpec("url", spec, redact(spec))
    if spec.lower().startswith("file://"):
        parts = urlsplit(spec)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(f"cannot read {spec}: file:// URLs of other hosts are not supported")
        spec = unquote(parts.path)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise SourceError(f"video source is a directory, not a file: {path}; pass a video file")
    if not path.is_file():
        raise SourceError(f"video file not found: {path}; check the path")
    return SourceSpec("file", str(path), str(path))


_OPEN_HINTS = {
    "webcam": "check the camera is connected and not in use by another program",
    "url": "check the URL, the network and the credentials",
    "file": "the file is corrupt or not a video format OpenCV can decode",
}


class VideoSource:
    """One opened cv2.VideoCapture with its `SourceInfo`; a context manager.

    `read` is safe to call from the capture thread while another thread calls
    `close`: a lock keeps `release` from running under a `read` in progress.

    A URL source that is lost after a successful `open` reconnects in `read`
    (see `ReconnectPolicy`), emitting `SourceEvent`s to `on_event`; `stop_event`
    ends the attempts within `STOP_POLL_S`, even while a connection attempt is
    still blocked in FFmpeg. With `wait_at_start`, a URL source that cannot be opened
    is retried the same way inside `open` (see there).

    Args:
        spec: source argument (see `parse_source`) or an already parsed `SourceSpec`.
        open_timeout_ms: how long to wait for a URL to connect.
        read_timeout_ms: how long a URL read may stall before it counts as lost.
        rtsp_transport: "tcp" (no packet loss, passes NAT) or "udp", for rtsp:// URLs.
        reconnect: backoff for URL sources; None turns reconnection off.
        stop_event: set to end a reconnect in progress (`read` then returns None).
        on_event: called with each `SourceEvent`, on the reading thread (or `open`'s).
        wait_at_start: a URL source (a camera that may be down or still booting) that
            cannot be opened is retried in `open` until it connects or `stop_event` is set,
            instead of failing. Webcam indices and files still fail at once: a missing
            device or file does not come back by waiting.
    """

    def __init__(
        self,
        spec: str | int | SourceSpec,
        *,
        open_timeout_ms: int = 5000,
        read_timeout_ms: int = 5000,
        rtsp_transport: str = "tcp",
        reconnect: ReconnectPolicy | None = ReconnectPolicy(),
        stop_event: threading.Event | None = None,
        on_event: Callable[[SourceEvent], None] | None = None,
        wait_at_start: bool = False,
    ) -> None:
        for name, value in (
            ("open_timeout_ms", open_timeout_ms),
            ("read_timeout_ms", read_timeout_ms),
        ):
            if value <= 0:
                raise ValueError(f"VideoSource {name} must be positive, but got {value}")
        if rtsp_transport not in RTSP_TRANSPORTS:
            raise ValueError(
                f"Invalid rtsp_transport {rtsp_transport!r}, expecting one of "
                f"{', '.join(RTSP_TRANSPORTS)}"
            )
        self.spec = spec if isinstance(spec, SourceSpec) else parse_source(spec)
        self.open_timeout_ms = open_timeout_ms
        self.read_timeout_ms = read_timeout_ms
        self.rtsp_transport = rtsp_transport
        self.reconnect = reconnect if self.spec.kind == "url" else None
        self.wait_at_start = wait_at_start and self.spec.kind == "url"
        if self.wait_at_start and reconnect is None:
            raise ValueError("VideoSource wait_at_start needs a reconnect policy, but got None")
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.on_event = on_event
        self.reconnects = 0
        self.undecodable = 0  # frames of a file skipped because they could not be decoded
        self.delivered = 0
        self.position_ms: float | None = None  # media time of the last frame, for files
        self._capture: cv2.VideoCapture | None = None
        self._first: np.ndarray | None = None
        self._info: SourceInfo | None = None
        self._shrink: float | None = None
        self._finite = False
        self._lock = threading.Lock()

    @property
    def source_id(self) -> str:
        return self.spec.source_id

    @property
    def info(self) -> SourceInfo:
        if self._info is None and self.wait_at_start and self.stop_event.is_set():
            raise SourceError(
                f"video source {self.source_id} was stopped before it connected; check "
                "stop_event after open()"
            )
        if self._info is None:
            raise SourceError(f"video source {self.source_id} is not open; call open() first")
        return self._info

    @property
    def file_path(self) -> Path | None:
        """The video file read, for sources that are local files."""
        return Path(str(self.spec.target)) if self.spec.kind == "file" else None

    def open(self) -> VideoSource:
        """Open the capture and read its first frame, kept for the first `read`.

        A URL of a finite video (an mp4 on a web server) is read like a file: losslessly,
        to its end, without reconnecting.

        With `wait_at_start`, a URL that cannot be opened is retried with the backoff of
        `reconnect`, forever, each attempt announced by a "reconnecting" `SourceEvent`;
        once it connects, a "reconnected" event with `down_s` follows and `open` returns.
        When `stop_event` is set (already, or within `STOP_POLL_S` while waiting) it returns
        without connecting: `info` then raises `SourceError` and `read` returns None, so
        the caller checks `stop_event` after `open` and ends the stream.

        Raises:
            SourceError: it cannot be opened or yields no first frame (with `wait_at_start`,
                for webcams and files only).
        """
        connected = self._first_connect()
        if connected is None:
            return self
        capture, first = connected
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if self.spec.kind != "webcam" else 0
        finite = self.spec.kind == "file" or (
            count > 0 and str(self.spec.target).lower().startswith(("http://", "https://"))
        )
        self._finite = finite
        if finite:
            self.reconnect = None
            self.position_ms = capture.get(cv2.CAP_PROP_POS_MSEC)
        first = self._fit(first)
        self._info = SourceInfo(
            source_id=self.source_id,
            # From the frame itself: some backends report 0 or the wrong size.
            width=first.shape[1],
            height=first.shape[0],
            fps=fps if math.isfinite(fps) and fps > 0 else FALLBACK_FPS,
            is_file=finite,
            frame_count=count if count > 0 and finite else None,
        )
        self._capture, self._first = capture, first
        return self

    def _fit(self, first: np.ndarray) -> np.ndarray:
        """Frames beyond any camera's size are downscaled (with a warning) rather than left to
        exhaust memory in detection."""
        height, width = first.shape[:2]
        if max(height, width) <= MAX_FRAME_SIDE:
            return first
        self._shrink = MAX_FRAME_SIDE / max(height, width)
        shrunk = self._shrunk(first)
        log.warning(
            "video source %s has %dx%d frames, beyond any camera's size: processing them "
            "downscaled to %dx%d",
            self.source_id, width, height, shrunk.shape[1], shrunk.shape[0],
        )  # fmt: skip
        return shrunk

    def _shrunk(self, image: np.ndarray) -> np.ndarray:
        return image if self._shrink is None else shrink(image, self._shrink)

    def _connect(self) -> tuple[cv2.VideoCapture, np.ndarray]:
        """A new capture and its first frame.

        Raises:
            SourceError: it cannot be opened or yields no first frame.
        """
        if self.spec.kind == "url":
            # Without these, FFmpeg can wait 30 s on a dead host or a stalled stream.
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.open_timeout_ms]
            params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.read_timeout_ms]
            with _ENV_LOCK:
                saved = os.environ.get(FFMPEG_OPTIONS_ENV)
                if str(self.spec.target).lower().startswith(("rtsp://", "rtsps://")):
                    os.environ[FFMPEG_OPTIONS_ENV] = f"rtsp_transport;{self.rtsp_transport}"
                try:
                    capture = cv2.VideoCapture(self.spec.target, cv2.CAP_FFMPEG, params)
                finally:
                    if saved is None:
                        os.environ.pop(FFMPEG_OPTIONS_ENV, None)
                    else:
                        os.environ[FFMPEG_OPTIONS_ENV] = saved
        elif self.spec.kind == "file":
            # FFmpeg's frame threads cost more CPU than they save: the stages are the parallelism.
            capture = cv2.VideoCapture(self.spec.target, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
        else:
            capture = cv2.VideoCapture(self.spec.target)
        hint = _OPEN_HINTS[self.spec.kind]
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open video source {self.source_id}: {hint}")
        ok, first = capture.read()
        if not ok or first is None:
            capture.release()
            raise SourceError(
                f"cannot read a first frame from video source {self.source_id}: {hint}"
            )
        return capture, first

    def read(self) -> np.ndarray | None:
        """Next BGR image, or None at the end of a file or once stopped while reconnecting.

        Raises:
            SourceError: a live source stopped delivering frames and does not reconnect.
        """
        if self._first is not None:
            image, self._first = self._first, None
            self.delivered += 1
            return image
        if self._finite:
            return self._read_finite()
        with self._lock:
            if self._capture is None:
                return None
            ok, image = self._capture.read()
        if ok and image is not None:
            self.delivered += 1
            return self._shrunk(image)
        if self.reconnect is not None:
            return self._reconnect()
        raise SourceError(
            f"lost video source {self.source_id}: it stopped delivering frames; "
            f"{_OPEN_HINTS[self.spec.kind]}"
        )

    def _read_finite(self) -> np.ndarray | None:
        """The next decodable frame of a file; frames that fail to decode in the middle are
        skipped and counted. None at the end."""
        failures = 0
        while failures <= self._failures_allowed():
            with self._lock:
                if self._capture is None:
                    return None
                ok, image = self._capture.read()
                position = self._capture.get(cv2.CAP_PROP_POS_MSEC)
            if ok and image is not None:
                if failures:
                    log.warning(
                        "%s: skipped %d undecodable frame(s) after frame %d",
                        self.source_id, failures, self.delivered - 1,
                    )  # fmt: skip
                    self.undecodable += failures
                self.delivered += 1
                self.position_ms = position
                return self._shrunk(image)
            failures += 1
        return None

    def _failures_allowed(self) -> int:
        count = self._info.frame_count if self._info is not None else None
        if count is None:
            return UNDECODABLE_RUN_LIMIT
        return max(count - self.delivered - self.undecodable, 0) + 1

    def raise_if_incomplete(self) -> None:
        """After a file's end: fail when frames it lists were neither read nor skipped as
        undecodable (a truncated file, or a web server that stopped sending)."""
        count = self.info.frame_count
        if count is not None and self.delivered + self.undecodable < count - 1:
            raise SourceError(
                f"video {self.source_id} ended after frame {self.delivered} of the {count} it "
                "lists: the rest could not be read; the outputs hold the frames before it"
            )

    def _emit(self, event: SourceEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _reconnect(self) -> np.ndarray | None:
        """Reconnect until it works or `stop_event` is set; the first new image, or None."""
        lost_at = time.monotonic()
        with self._lock:
            if self._capture is not None:
                self._capture.release()
        retried = self._retry(lost_at, "lost video source")
        if retried is None:
            return None
        capture, first, attempt = retried
        with self._lock:
            if self._capture is None:  # closed meanwhile
                capture.release()
                return None
            self._capture = capture
        self._report_up(lost_at, attempt, "reconnected to")
        return self._shrunk(first)

    def _first_connect(self) -> tuple[cv2.VideoCapture, np.ndarray] | None:
        """The first capture and its first frame; None when `stop_event` ended a wait at start.

        Raises:
            SourceError: it cannot be opened and does not wait at start.
        """
        if not self.wait_at_start:
            return self._connect()
        started = time.monotonic()
        if self.stop_event.is_set():
            return None
        outcome = self._connect_unless_stopped()
        if not isinstance(outcome, SourceError):
            return outcome
        log.warning("%s; retrying until it connects or the stream is stopped", outcome)
        retried = self._retry(started, "waiting for video source")
        if retried is None:
            return None
        capture, first, attempt = retried
        self._report_up(started, attempt, "connected to")
        return capture, first

    def _retry(
        self, down_since: float, lost: str
    ) -> tuple[cv2.VideoCapture, np.ndarray, int] | None:
        """Connect attempts with the backoff of `reconnect` until one works (its capture, first
        image and attempt number) or `stop_event` is set (None); `lost` begins the log lines.

        Each attempt is announced by a "reconnecting" event. Nothing is kept per attempt: each
        connect thread has ended (or was abandoned on stop) before the next attempt begins.
        """
        assert self.reconnect is not None
        attempt, logged_at = 0, time.monotonic()
        while not self.stop_event.is_set():
            attempt += 1
            delay = self.reconnect.delay_s(attempt)
            now = time.monotonic()
            if attempt <= LOGGED_ATTEMPTS:
                quiet = "; logged once a minute from here on" if attempt == LOGGED_ATTEMPTS else ""
                log.warning(
                    "%s %s: reconnecting in %.2f s (attempt %d)%s",
                    lost, self.source_id, delay, attempt, quiet,
                )  # fmt: skip
                logged_at = now
            elif now - logged_at >= QUIET_LOG_INTERVAL_S:
                log.warning(
                    "video source %s still down after %.0f min: reconnecting every %.2f s "
                    "(attempt %d)",
                    self.source_id, (now - down_since) / 60, delay, attempt,
                )  # fmt: skip
                logged_at = now
            self._emit(SourceEvent("reconnecting", now, attempt))
            if self.stop_event.wait(delay):
                return None
            outcome = self._connect_unless_stopped()
            if isinstance(outcome, tuple):
                return (*outcome, attempt)
            if outcome is not None:
                log.debug("attempt %d failed: %s", attempt, outcome)
        return None

    def _report_up(self, down_since: float, attempt: int, verb: str) -> None:
        down_s = time.monotonic() - down_since
        self.reconnects += 1
        log.warning(
            "%s video source %s after %.2f s (attempt %d)", verb, self.source_id, down_s, attempt
        )
        self._emit(SourceEvent("reconnected", time.monotonic(), attempt, down_s))

    def _connect_unless_stopped(
        self,
    ) -> tuple[cv2.VideoCapture, np.ndarray] | SourceError | None:
        """`_connect` on a helper thread: the capture and its first frame, or why it failed;
        None when `stop_event` was set first (the attempt is abandoned, its capture released
        when it ends).

        FFmpeg's own open timeout can exceed the time a stop may take. One attempt at a
        time: this waits for the helper as long as it runs, so an attempt that hangs beyond
        FFmpeg's timeouts (warned about once) delays the next one rather than piling up
        threads.
        """
        outcome: list[tuple[cv2.VideoCapture, np.ndarray] | SourceError] = []
        abandoned = threading.Event()
        lock = threading.Lock()

        def connect() -> None:
            connected: tuple[cv2.VideoCapture, np.ndarray] | SourceError
            try:
                self._check_reachable()
                connected = self._connect()
            except SourceError as error:
                connected = error
            except Exception as error:  # one failed attempt; its text may hold the URL's password
                connected = SourceError(
                    f"cannot open video source {self.source_id}: {type(error).__name__}"
                )
            with lock:
                if abandoned.is_set() and isinstance(connected, tuple):
                    connected[0].release()
                outcome.append(connected)

        worker = threading.Thread(target=connect, name=f"connect:{self.source_id}", daemon=True)
        worker.start()
        # The reachability check and FFmpeg's open may each take the open timeout.
        timeouts_s = (2 * self.open_timeout_ms + self.read_timeout_ms) / 1000
        hung_at: float | None = time.monotonic() + timeouts_s + HUNG_CONNECT_GRACE_S
        while worker.is_alive():
            worker.join(STOP_POLL_S)
            if self.stop_event.is_set():
                with lock:
                    abandoned.set()
                    if outcome and isinstance(outcome[0], tuple):
                        outcome[0][0].release()
                return None
            if hung_at is not None and time.monotonic() > hung_at:
                log.warning(
                    "connecting to video source %s is still blocked %.1f s past its open and "
                    "read timeouts; no other attempt starts until it returns",
                    self.source_id, HUNG_CONNECT_GRACE_S,
                )  # fmt: skip
                hung_at = None
        return outcome[0]

    def _check_reachable(self) -> None:
        """For rtsp(s):// URLs, fail an attempt before FFmpeg is tried when the host does not
        accept a TCP connection on the port: OpenCV holds one process-wide lock while any FFmpeg
        capture opens, so a camera that never answers would stall every other source's
        (re)connects for its whole open timeout. http(s) is left to FFmpeg, which may use a
        proxy.

        Raises:
            SourceError: the host refused, or did not answer within the open timeout.
        """
        parts = urlsplit(str(self.spec.target))
        scheme = parts.scheme.lower()
        try:
            port = parts.port or RTSP_DEFAULT_PORTS.get(scheme)
        except ValueError:  # a malformed port: FFmpeg's error says it
            return
        if scheme not in RTSP_DEFAULT_PORTS or not parts.hostname or port is None:
            return
        try:
            with socket.create_connection(
                (parts.hostname, port), timeout=self.open_timeout_ms / 1000
            ):
                pass
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise SourceError(
                f"cannot reach video source {self.source_id} ({reason}): check the camera is on "
                "and the URL's host and port"
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._capture is not None:
                self._capture.release()
                self._capture = None
        self._first = None

    def __enter__(self) -> VideoSource:
        return self if self._capture is not None else self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SimulatedLiveSource(VideoSource):
    """A video file played as a live camera: paced at `fps`, reported as not a file.

    Because `info.is_file` is False the pipeline gives it a `LatestFrameBuffer`,
    so a slow consumer drops frames exactly as it would on a real camera. Reading
    never catches up after a stall: like a camera, late frames are simply late.

    Args:
        path: video file.
        fps: playback rate; None plays at the file's own rate.
        loop: start over at the end instead of ending (soak runs); frame numbers keep counting.
    """

    def __init__(self, path: str | Path, fps: float | None = None, loop: bool = False) -> None:
        spec = parse_source(str(path))
        if spec.kind != "file":
            raise SourceError(f"simulated live source needs a video file, but got {spec.source_id}")
        if fps is not None and not fps > 0:
            raise ValueError(f"SimulatedLiveSource fps must be positive, but got {fps}")
        super().__init__(spec)
        self.fps = fps
        self.loop = loop
        self._next_due = 0.0

    def open(self) -> SimulatedLiveSource:
        super().open()
        info = self.info
        self._info = replace(info, fps=self.fps or info.fps, is_file=False, frame_count=None)
        self._next_due = time.monotonic()
        return self

    def read(self) -> np.ndarray | None:
        # Sleeps at most one frame period, so a stop request is still seen promptly.
        delay = self._next_due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next_due = max(self._next_due, time.monotonic()) + 1.0 / self.info.fps
        image = super().read()
        if image is None and self.loop:
            with self._lock:
                if self._capture is not None:
                    self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            image = super().read()
        return image


class CaptureThread(threading.Thread):
    """Reads an opened `VideoSource` into a buffer until the end, an error or `stop_event`.

    Each image becomes a `Frame` numbered by its position in the source (so a
    live consumer sees gaps where frames were dropped). The buffer always ends
    with `END_OF_STREAM`; an exception raised while reading is kept in `error`
    for the consumer to re-raise with `raise_if_failed()` once it sees the end.

    A daemon thread: a driver stuck inside a read cannot keep the process alive.
    Join it before closing the source.
    """

    def __init__(
        self, source: VideoSource, buffer: FrameBuffer, stop_event: threading.Event
    ) -> None:
        super().__init__(name=f"capture:{source.source_id}", daemon=True)
        self.source = source
        self.buffer = buffer
        self.stop_event = stop_event
        self.frames_read = 0
        self.error: Exception | None = None

    @property
    def drops(self) -> int:
        return self.buffer.dropped

    def run(self) -> None:
        source_id = self.source.source_id
        try:
            while not self.stop_event.is_set():
                image = self.source.read()
                if image is None:
                    break
                frame = Frame(
                    image, self.frames_read, time.monotonic(), source_id, self.source.position_ms
                )
                self.frames_read += 1
                # Blocks only for files; gives up when stop_event is set.
                if not self.buffer.put(frame):
                    break
        except Exception as exc:  # handed to the consumer through `error`, not lost
            self.error = exc
        finally:
            self.buffer.put(END_OF_STREAM, timeout=END_PUT_TIMEOUT_S)

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, the error that ended the capture, if any."""
        if self.error is not None:
            raise self.error
