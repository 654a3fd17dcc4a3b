"""The live window: opened at the frame's size (shrunk to fit the screen), a file played at its
own pace, keys to quit, pause and save a snapshot."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stream.outputs import OutputError
from stream.overlay import font_scale, hud_line

log = logging.getLogger(__name__)

QUIT_KEYS = (ord("q"), 27)  # q and Esc
PAUSE_KEY = ord(" ")
SNAPSHOT_KEY = ord("s")
KEY_HELP = "q quit · space pause · s snapshot"
PAUSED_HELP = "paused · space resumes · s snapshot · q quit"
KEY_HELP_S = 5.0  # the key help shows for the first seconds
PAUSED_POLL_MS = 50  # how often a paused window looks for keys, the close button and a stop
# Where the screen's size cannot be asked: a common laptop and desktop screen.
FALLBACK_SCREEN = (1920, 1080)
# Of the screen, what a window may take: title bar, panels and docks need the rest.
SCREEN_FRACTION = 0.9
# Qt and GTK windows with an image widget only: no toolbar, status bar or zoom on click.
WINDOW_FLAGS = cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL


def has_display() -> bool:
    return sys.platform != "linux" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def _x11_screen_size() -> tuple[int, int]:
    # OpenCV has no API for it, and xdpyinfo or Tk may be missing; libX11 is there when
    # OpenCV's Qt runs on X11.
    x11 = ctypes.CDLL("libX11.so.6")
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    for name in ("XDefaultScreen", "XCloseDisplay"):
        getattr(x11, name).argtypes = [ctypes.c_void_p]
    for name in ("XDisplayWidth", "XDisplayHeight"):
        getattr(x11, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
    display = x11.XOpenDisplay(None)
    if not display:
        raise OSError(f"cannot open X display {os.environ.get('DISPLAY')!r}")
    try:
        screen = x11.XDefaultScreen(display)
        return x11.XDisplayWidth(display, screen), x11.XDisplayHeight(display, screen)
    finally:
        x11.XCloseDisplay(display)


def screen_size() -> tuple[int, int]:
    """The screen's size in pixels, or FALLBACK_SCREEN where it cannot be found out."""
    try:
        if sys.platform == "win32":
            metrics = ctypes.windll.user32.GetSystemMetrics
            return metrics(0), metrics(1)
        if sys.platform == "linux" and os.environ.get("DISPLAY"):
            return _x11_screen_size()
    except (OSError, AttributeError) as error:
        log.debug("screen size unknown (%s): assuming %dx%d", error, *FALLBACK_SCREEN)
    return FALLBACK_SCREEN


def fit_to_screen(width: int, height: int, screen: tuple[int, int]) -> tuple[int, int]:
    """The window's size: the frame's own, shrunk (aspect ratio kept) to fit the screen."""
    shrink = min(1.0, screen[0] * SCREEN_FRACTION / width, screen[1] * SCREEN_FRACTION / height)
    return max(1, round(width * shrink)), max(1, round(height * shrink))


class Pacer:
    """When each frame of a file is due on screen: its media time after the first one shown.

    Re-based where the clock would have the window rush to catch up (processing fell behind,
    or after a pause) or wait on a gap in the file's timestamps.
    """

    LATE_S = 0.25
    GAP_S = 1.0

    def __init__(self) -> None:
        self._base: tuple[float, float] | None = None  # (monotonic time, media time in ms)

    def due(self, t_ms: float, now: float) -> float:
        if self._base is not None:
            at = self._base[0] + (t_ms - self._base[1]) / 1000.0
            if now - self.LATE_S <= at <= now + self.GAP_S:
                return at
        self._base = (now, t_ms)
        return now

    def restart(self) -> None:
        self._base = None


@dataclass(frozen=True)
class Snapshots:
    """Where `s` saves PNGs: `folder/STEM-frameN.png`, never over an existing file."""

    folder: Path
    stem: str

    def save(self, image: np.ndarray, index: int) -> Path:
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise OSError("PNG encoding failed")
        n = 1
        while True:
            path = self.folder / f"{self.stem}-frame{index}{'' if n == 1 else f'-{n}'}.png"
            try:
                with path.open("xb") as file:  # x: an existing file is never replaced
                    file.write(png.tobytes())
                return path
            except FileExistsError:
                n += 1


class WindowSink:
    """A cv2 window sized to the frame; `show` returns False once the user presses q or Esc
    or closes the window.

    With `pace`, a frame waits until it is due (Pacer); meanwhile and while paused the
    window keeps answering keys, and a set `stop` event ends a pause.
    """

    def __init__(
        self,
        title: str,
        frame_size: tuple[int, int],
        pace: bool,
        snapshots: Snapshots,
        stop: threading.Event | None = None,
    ) -> None:
        self.title = title
        self.size = fit_to_screen(*frame_size, screen_size())
        # How much smaller than the frame it is on screen; labels are sized for it.
        self.shown = self.size[0] / frame_size[0]
        self._scale = font_scale(*frame_size, self.shown)
        self._pacer = Pacer() if pace else None
        self._snapshots = snapshots
        self._stop = stop if stop is not None else threading.Event()
        self._on_screen: tuple[np.ndarray, int] | None = None
        self._first_shown_at: float | None = None
        self._paused = False
        try:
            cv2.namedWindow(title, WINDOW_FLAGS)
            cv2.resizeWindow(title, *self.size)
        except cv2.error as error:
            raise OutputError(
                f"cannot open a window ({str(error).strip().splitlines()[-1]}); "
                "run with --no-window on a machine without a display"
            ) from error
        log.debug("window %dx%d for %dx%d frames", *self.size, *frame_size)

    def show(self, image: np.ndarray, index: int, t_ms: float) -> bool:
        """Show frame `index` (at `t_ms` in the source) once it is due."""
        due = self._pacer.due(t_ms, time.monotonic()) if self._pacer is not None else None
        if not self._wait(due):
            return False
        if self._first_shown_at is None:
            self._first_shown_at = time.monotonic()
        self._on_screen = (image, index)
        cv2.imshow(self.title, self._decorated(image))
        return self._answer(cv2.waitKey(1))

    def _wait(self, due: float | None) -> bool:
        """Answer keys until `due` (None: now) has come and the window is not paused."""
        while not self._stop.is_set():
            if self._paused:
                wait_ms = PAUSED_POLL_MS
            else:
                left_s = due - time.monotonic() if due is not None else 0.0
                if left_s <= 0:
                    return True
                wait_ms = max(1, int(left_s * 1000))
            if not self._answer(cv2.waitKey(wait_ms)):
                return False
        return True

    def _answer(self, key: int) -> bool:
        """Act on a key (-1: none); False when the run is to end."""
        key &= 0xFF
        if key in QUIT_KEYS or not self._visible():
            return False
        if key == SNAPSHOT_KEY:
            self._snapshot()
        elif key == PAUSE_KEY and self._on_screen is not None:
            self._paused = not self._paused
            image, index = self._on_screen
            if self._paused:
                log.info("paused at frame %d (space resumes)", index)
            elif self._pacer is not None:
                self._pacer.restart()
            cv2.imshow(self.title, self._decorated(image))
        return True

    def _visible(self) -> bool:
        try:
            return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:  # Qt drops its GUI state once the last window was closed
            return False

    def _decorated(self, image: np.ndarray) -> np.ndarray:
        """The frame with the key help (first seconds) or the paused line; drawn on a copy,
        so that snapshots and outputs have neither."""
        if self._paused:
            help_line = PAUSED_HELP
        elif self._first_shown_at is None or time.monotonic() - self._first_shown_at < KEY_HELP_S:
            help_line = KEY_HELP
        else:
            return image
        image = image.copy()
        hud_line(image, help_line, 1, self._scale)
        return image

    def _snapshot(self) -> None:
        if self._on_screen is None:
            return
        image, index = self._on_screen
        try:
            path = self._snapshots.save(image, index)
        except OSError as error:
            log.warning("snapshot not saved in %s: %s", self._snapshots.folder, error)
            return
        log.info("snapshot saved: %s", path)

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:  # closed with its close button: Qt has already destroyed it
            pass

    def __enter__(self) -> WindowSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
