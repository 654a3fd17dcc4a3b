"""The live window under a real X server (Xvfb): its size, label size on screen, pace, keys and
close button; and the pieces behind them (font scale, pacer, snapshot names) without one."""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from stream.outputs import partial_path
from stream.overlay import FEMALE_COLOUR, FONT, MALE_COLOUR, NO_GENDER_COLOUR, font_scale
from stream.window import Pacer, Snapshots, fit_to_screen
from tests.conftest import HAMILTON, VIDEOS, frame_records, require
from tests.test_shutdown import EXIT_LIMIT_S

S32 = VIDEOS / "livePortrait__source__s32.mp4"  # 1280x720, 30 FPS, 180 frames
SCREEN = (1600, 1000)
X_TOOLS = {"Xvfb": "xvfb", "xdotool": "xdotool", "import": "imagemagick"}
MIN_CAP_PX = 14  # the bar for a legible label on screen
START_S = 60.0  # models load before the window opens; CI machines may be slow
WAIT_S = 20.0


# -- without a display ----------------------------------------------------------------------


def cap_height_px(scale: float) -> int:
    """Rows of ink of a capital M drawn at `scale` with the overlay's font and thickness."""
    image = np.zeros((400, 400), np.uint8)
    cv2.putText(image, "M", (10, 300), FONT, scale, 255, max(1, round(scale * 2)), cv2.LINE_AA)
    rows = np.nonzero((image > 127).any(axis=1))[0]
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("size", [(640, 360), (1280, 720), (1920, 1080), (3840, 2160), (720, 1280)])
def test_given_frame_from_360p_to_4k_when_fitted_to_screen_then_label_cap_is_legible(
    size: tuple[int, int],
) -> None:
    width, height = fit_to_screen(*size, SCREEN)
    shown = width / size[0]
    assert width <= SCREEN[0] and height <= SCREEN[1]
    assert width / height == pytest.approx(size[0] / size[1], rel=0.01)
    on_screen = cap_height_px(font_scale(*size, shown)) * shown
    assert on_screen >= MIN_CAP_PX
    # Proportional to the frame beyond the minimum: a 4K frame on a 4K screen gets big labels.
    assert cap_height_px(font_scale(3840, 2160)) >= 4 * cap_height_px(font_scale(640, 360)) * 0.8


def test_given_frames_on_time_when_paced_then_each_is_due_at_its_media_time() -> None:
    pacer = Pacer()
    assert pacer.due(1000.0, now=50.0) == 50.0  # the first frame is due at once
    assert pacer.due(1040.0, now=50.001) == pytest.approx(50.04)
    assert pacer.due(2000.0, now=50.5) == pytest.approx(51.0)
    # Fell behind by more than LATE_S (slow processing): re-based, no rush to catch up.
    assert pacer.due(2040.0, now=52.0) == 52.0
    assert pacer.due(2080.0, now=52.0) == pytest.approx(52.04)
    # A gap in the timestamps is not waited out.
    assert pacer.due(9000.0, now=52.05) == 52.05
    pacer.restart()  # after a pause
    assert pacer.due(9040.0, now=80.0) == 80.0


def test_given_snapshot_name_taken_when_saved_then_existing_file_is_kept(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path, "clip")
    image = np.full((36, 64, 3), 200, np.uint8)
    (tmp_path / "clip-frame7.png").write_bytes(b"mine")
    saved = [snapshots.save(image, 7), snapshots.save(image, 7)]
    assert [path.name for path in saved] == ["clip-frame7-2.png", "clip-frame7-3.png"]
    assert (tmp_path / "clip-frame7.png").read_bytes() == b"mine"
    assert np.array_equal(cv2.imread(str(saved[0])), image)


# -- a real window under Xvfb -----------------------------------------------------------------


@pytest.fixture(scope="module")
def x_display() -> Iterator[str]:
    """A fresh Xvfb screen of SCREEN size on a free display number; its name (":N")."""
    missing = [package for tool, package in X_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs a virtual X server and tools: apt-get install {' '.join(missing)}")
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
         "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], WAIT_S)
        number = os.read(read_fd, 32).decode().strip() if ready else ""
        assert number, f"Xvfb did not report a display within {WAIT_S} s"
        yield f":{number}"
    finally:
        os.close(read_fd)
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


@dataclass
class WindowRun:
    """An `agestream run` with its window on an Xvfb display, driven like a user would."""

    process: subprocess.Popen
    display: str
    log: Path
    jsonl: Path
    window: str = ""

    def x(self, *command: str, timeout: float = WAIT_S) -> str:
        env = {**os.environ, "DISPLAY": self.display}
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=True
        )
        return done.stdout

    def find_window(self) -> WindowRun:
        search = ("xdotool", "search", "--sync", "--onlyvisible", "--name", "^agestream: ")
        found = self.x(*search, timeout=START_S)
        self.window = found.split()[0]
        return self

    def size(self) -> tuple[int, int]:
        shell = self.x("xdotool", "getwindowgeometry", "--shell", self.window)
        values = dict(line.split("=", 1) for line in shell.split())
        return int(values["WIDTH"]), int(values["HEIGHT"])

    def key(self, name: str) -> None:
        self.x("xdotool", "key", "--window", self.window, name)

    def screenshot(self) -> np.ndarray:
        """The window's pixels as they are on screen."""
        env = {**os.environ, "DISPLAY": self.display}
        png = subprocess.run(
            ["import", "-window", self.window, "png:-"],
            env=env, capture_output=True, timeout=WAIT_S, check=True,
        ).stdout  # fmt: skip
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)

    def lines(self) -> list[str]:
        """The JSON lines written so far (to the partial file until the run ends)."""
        for path in (partial_path(self.jsonl), self.jsonl):
            try:
                return path.read_text().splitlines()
            except FileNotFoundError:
                continue
        return []

    def wait_lines(self, count: int, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < count:
            assert time.monotonic() < deadline, f"no {count} JSON lines in {timeout} s"
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.02)

    def wait_log(self, pattern: str, nth: int = 0, timeout: float = WAIT_S) -> re.Match:
        """The `nth` (from 0) match of `pattern` in the run's log, once it is there."""
        deadline = time.monotonic() + timeout
        while len(found := list(re.finditer(pattern, self.log.read_text()))) <= nth:
            assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{self.log.read_text()}"
            time.sleep(0.02)
        return found[nth]

    def finish(self, timeout: float = WAIT_S) -> str:
        self.process.wait(timeout=timeout)
        return self.log.read_text()


@pytest.fixture
def start(x_display: str, tmp_path: Path) -> Iterator[Callable[..., WindowRun]]:
    """Starts `agestream run SOURCE --json OUT ARGS...` with a window; killed if left over."""
    runs: list[WindowRun] = []

    def launch(source: Path, *args: str) -> WindowRun:
        out = tmp_path / f"run{len(runs)}"
        out.mkdir()
        log = out / "stderr.txt"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "stream", "run", str(source), "--json",
                 str(out / "o.jsonl"), *args],
                env={**os.environ, "DISPLAY": x_display}, stdout=subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        runs.append(WindowRun(process, x_display, log, out / "o.jsonl"))
        return runs[-1].find_window()

    yield launch
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait(timeout=10)


def label_cap_px(image: np.ndarray, box: list[float], shown: float) -> int:
    """Height of the label drawn above `box` (frame pixels), or below it where the space above
    is taken, in `image` shown at `shown` times the frame's size: the run of rows next to the
    box dense with label-coloured ink."""
    x1, y1, x2, y2 = (v * shown for v in box)
    above = (max(0, int(y1 - 0.25 * image.shape[0])), int(y1) - 2)  # outside the box line
    below = (int(y2) + 3, int(y2 + 0.25 * image.shape[0]))
    return max(_ink_rows(image, x1, x2, *above), _ink_rows(image, x1, x2, *below, reverse=False))


def _ink_rows(
    image: np.ndarray, x1: float, x2: float, top: int, bottom: int, reverse: bool = True
) -> int:
    """The run of label-ink rows nearest the box: the last rows of the band (`reverse`: a band
    above the box), else its first."""
    region = image[top:bottom, max(0, int(x1) - 2) : int(x2 + 2 * (x2 - x1))].astype(int)
    ink = np.zeros(region.shape[:2], bool)
    for colour in (FEMALE_COLOUR, MALE_COLOUR, NO_GENDER_COLOUR):
        ink |= np.abs(region - np.array(colour)).sum(axis=2) < 90
    dense = ink.sum(axis=1) >= 0.25 * max(1, ink.sum(axis=1).max())
    rows = np.nonzero(dense)[0]
    height, previous = 0, None
    for row in reversed(rows) if reverse else rows:
        if previous is not None and abs(row - previous) > 1:
            break
        height, previous = height + 1, row
    return height


def paused_on_face(run: WindowRun) -> tuple[int, list[float]]:
    """Press space (again, until a face is on screen); the frame shown and its first face's box,
    once the run says it paused."""
    for attempt in range(10):
        run.key("space")
        index = int(run.wait_log(r"paused at frame (\d+)", nth=attempt).group(1))
        record = next(json.loads(line) for line in run.lines() if f'"frame":{index},' in line)
        shown = [face for face in record["faces"] if face["track"] is not None]
        if shown:
            return index, shown[0]["box"]
        run.key("space")  # resume, and pause on a later frame
        time.sleep(0.3)
    raise AssertionError("no face on screen in 10 pauses")


def raw_frame(path: Path, index: int) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    try:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, image = capture.read()
    finally:
        capture.release()
    assert ok
    return image


def test_given_720p_file_when_shown_then_window_is_frame_size_and_keys_work(start) -> None:
    clip = require(S32)
    run = start(clip)
    assert run.size() == (1280, 720)  # fits in the 1600x1000 screen: the frame's own size

    run.wait_lines(20)
    index, box = paused_on_face(run)
    written = len(run.lines())
    time.sleep(1.0)
    assert len(run.lines()) == written, "a paused run still took frames"
    assert label_cap_px(run.screenshot(), box, 1.0) >= MIN_CAP_PX

    run.key("s")
    snapshot = Path(run.wait_log(r"snapshot saved: (\S+)").group(1))
    assert snapshot == run.jsonl.parent / f"{clip.stem}-frame{index}.png"
    image, raw = cv2.imread(str(snapshot)), raw_frame(clip, index)
    assert image.shape == raw.shape
    assert label_cap_px(image, box, 1.0) >= MIN_CAP_PX
    assert label_cap_px(raw, box, 1.0) < MIN_CAP_PX  # the label is ours, not the scene's

    run.x("xdotool", "windowsize", run.window, "900", "800")  # taller than 16:9
    deadline = time.monotonic() + WAIT_S
    while run.size() != (900, 800):
        assert time.monotonic() < deadline, "the window was not resized"
        time.sleep(0.05)
    time.sleep(0.3)  # repainted by the paused window's event loop
    shot = run.screenshot()
    frame_rows = np.nonzero((shot != shot[0, 0]).any(axis=(1, 2)))[0]  # between the bars
    assert frame_rows.size == pytest.approx(900 * 720 / 1280, abs=2)

    run.key("space")
    run.wait_lines(written + 10, timeout=WAIT_S)  # resumed
    run.key("q")
    stderr = run.finish()
    assert run.process.returncode == 0, stderr
    frames = frame_records(run.jsonl)  # finalized: renamed from the partial file
    assert not partial_path(run.jsonl).exists()
    assert written - 1 + 10 <= len(frames) < 180, "the lines but the start record are frames"
    assert f"{len(frames)} frames in " in stderr


def frame_rate(run: WindowRun, first: int, last: int) -> float:
    """Frames per second of wall time while the run wrote its JSON lines `first` to `last`
    (each is written as its frame comes up to be shown)."""
    run.wait_lines(first)
    start_at, start_count = time.monotonic(), len(run.lines())
    deadline = start_at + START_S
    while (count := len(run.lines())) < last:
        assert time.monotonic() < deadline, f"no {last} JSON lines in {START_S} s"
        time.sleep(0.005)
    return (count - start_count) / (time.monotonic() - start_at)


def test_given_file_in_window_when_played_then_at_its_own_rate_unless_fast(start) -> None:
    clip = require(HAMILTON)  # 640x360 at 29.97 FPS, 275 frames
    run = start(clip)
    assert run.size() == (640, 360)
    paced = frame_rate(run, 30, 240)
    assert paced == pytest.approx(29.97, rel=0.05)
    _, box = paused_on_face(run)
    assert label_cap_px(run.screenshot(), box, 1.0) >= MIN_CAP_PX
    run.key("q")
    assert run.finish() and run.process.returncode == 0

    fast = start(clip, "--fast")
    assert frame_rate(fast, 30, 240) > 1.25 * 29.97, fast.log.read_text()
    assert " 275 frames in " in fast.finish(timeout=START_S) and fast.process.returncode == 0


@pytest.fixture(scope="module")
def clip_4k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 90 frames of the 720p clip upscaled to 3840x2160: larger than the screen."""
    path = tmp_path_factory.mktemp("4k") / "s32-4k.mp4"
    with av.open(str(require(S32))) as source, av.open(str(path), "w") as target:
        stream = target.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 3840, 2160, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        for index, frame in enumerate(source.decode(video=0)):
            if index == 90:
                break
            image = cv2.resize(frame.to_ndarray(format="bgr24"), (3840, 2160))
            target.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        target.mux(stream.encode())
    return path


def test_given_4k_file_when_shown_then_window_shrinks_to_fit_keeping_aspect_ratio(
    start, clip_4k: Path
) -> None:
    run = start(clip_4k)
    width, height = run.size()
    assert (width, height) == (1440, 810)  # 90% of the screen's width, 16:9 kept
    run.wait_lines(3)
    _, box = paused_on_face(run)
    assert label_cap_px(run.screenshot(), box, width / 3840) >= MIN_CAP_PX
    run.key("Escape")
    assert run.finish() and run.process.returncode == 0


def close_window(display: str, window: str) -> None:
    """Ask the window to close the way a window manager does for its close button: a
    WM_DELETE_WINDOW client message (Xvfb has no window manager whose button to click)."""
    x11 = ctypes.CDLL("libX11.so.6")
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XInternAtom.restype = ctypes.c_ulong
    x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XSendEvent.argtypes = [
        ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    ]  # fmt: skip
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]

    class ClientMessage(ctypes.Structure):  # XClientMessageEvent, padded to an XEvent
        _fields_ = [
            ("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
            ("display", ctypes.c_void_p), ("window", ctypes.c_ulong),
            ("message_type", ctypes.c_ulong), ("format", ctypes.c_int),
            ("data", ctypes.c_long * 5), ("pad", ctypes.c_long * 12),
        ]  # fmt: skip

    connection = x11.XOpenDisplay(display.encode())
    assert connection, f"cannot open display {display}"
    try:
        message = ClientMessage(
            type=33,  # ClientMessage
            window=int(window),
            message_type=x11.XInternAtom(connection, b"WM_PROTOCOLS", 0),
            format=32,
        )
        message.data[0] = x11.XInternAtom(connection, b"WM_DELETE_WINDOW", 0)
        assert x11.XSendEvent(connection, int(window), 0, 0, ctypes.byref(message))
        x11.XFlush(connection)
    finally:
        x11.XCloseDisplay(connection)


@pytest.mark.parametrize(
    ("ending", "returncode"),
    [("close button", 0), (signal.SIGINT, 130), (signal.SIGTERM, 130)],
    ids=["close-button", "SIGINT", "SIGTERM"],
)
def test_given_paused_run_when_closed_or_signalled_then_it_ends_promptly_with_outputs(
    start, ending: str | signal.Signals, returncode: int
) -> None:
    run = start(require(S32))
    run.wait_lines(10)
    paused_on_face(run)
    written = len(run.lines())
    sent_at = time.monotonic()
    if ending == "close button":
        close_window(run.display, run.window)
    else:
        run.process.send_signal(ending)
    stderr = run.finish()
    assert time.monotonic() - sent_at < EXIT_LIMIT_S, stderr
    assert run.process.returncode == returncode, stderr
    assert len(run.jsonl.read_text().splitlines()) == written
    assert f" {written - 1} frames in " in stderr, "every line but the start record is a frame"
