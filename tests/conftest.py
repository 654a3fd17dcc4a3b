"""What the tests share: the data beside the checkout in ../shared (CI has it there too), runs
of the command, waits, free ports and a headless Chromium page."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIDEOS = SHARED / "data" / "videos"
UTKFACE = SHARED / "data" / "utkface-dev"
HAMILTON = VIDEOS / "face_recognition__short_hamilton_clip.mp4"


def decoded_frame_count(path: Path) -> int:
    """Frames a video actually decodes to (container counts can be approximate)."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def require(path: Path) -> Path:
    """Skip the calling test, saying why, when shared data is missing."""
    if not path.exists():
        pytest.skip(f"needs shared test data at {path} (../shared beside the checkout)")
    return path


CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root, on a machine with no network beyond itself: no sandbox, no GPU, and none
# of Chromium's own background connections.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextmanager
def chromium_page(width: int, height: int) -> Iterator:
    """A page of Debian's Chromium driven by Playwright, closed afterwards; skips the calling
    test, saying what to install, when either is missing."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("needs the playwright package: pip install -e '.[dev]' (no browser download)")
    if not CHROMIUM.exists():
        pytest.skip(f"needs Chromium at {CHROMIUM}: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def keep_screenshot(shot: Path) -> None:
    """A copy of `shot` in $AGESTREAM_SCREENSHOT_DIR when it is set (for the closing notes)."""
    if os.environ.get("AGESTREAM_SCREENSHOT_DIR"):
        target = Path(os.environ["AGESTREAM_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout_s: float = 120.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def frame_records(path: Path) -> list[dict]:
    """A run's JSON-lines frame records (not its start or source-event records)."""
    records = (json.loads(line) for line in path.read_text().splitlines())
    return [record for record in records if "frame" in record]


def run_json_lines(
    clip: Path, out: Path, config: Path | None = None, timeout: float = 300
) -> list[dict]:
    """`agestream run CLIP --no-window --json OUT` (with `config` if given); its records."""
    command = [sys.executable, "-m", "stream", "run", str(clip), "--no-window", "--json", str(out)]
    if config is not None:
        command += ["--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def face_records(records: list[dict]) -> list[tuple[float, dict]]:
    """(t_ms, face) for every face of every frame record."""
    return [(r["t_ms"], face) for r in records if "faces" in r for face in r["faces"]]


@pytest.fixture(scope="session")
def made_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clips built from the shared ones (tests/clips.py): four people at once in a grid, one
    person who leaves for 3 s and comes back, and 49 s of footage with no face."""
    from tests.clips import grid_clip, leave_and_return_clip, no_face_clip

    for name in ("livePortrait__driving__d3.mp4", "livePortrait__source__s32.mp4"):
        require(VIDEOS / name)
    folder = tmp_path_factory.mktemp("clips")
    grid = [VIDEOS / f"livePortrait__{n}.mp4" for n in ("driving__d3", "source__s32")]
    grid += [VIDEOS / "livePortrait__driving__d19.mp4", HAMILTON]
    return {
        "grid": grid_clip(grid, folder / "grid.mp4"),
        "leave_return": leave_and_return_clip(
            VIDEOS / "livePortrait__driving__d19.mp4", folder / "leave_return.mp4"
        ),
        "no_face": no_face_clip(sorted(VIDEOS.glob("*.mp4")), folder / "no_face.mp4"),
    }


@pytest.fixture(scope="session")
def clip_runs(
    tmp_path_factory: pytest.TempPathFactory, made_clips: dict[str, Path]
) -> dict[str, list[dict]]:
    """Every shared clip's and made clip's run, as JSON-lines records, by clip name."""
    folder = tmp_path_factory.mktemp("runs")
    clips = {path.stem: path for path in sorted(VIDEOS.glob("*.mp4"))} | made_clips
    return {name: run_json_lines(clip, folder / f"{name}.jsonl") for name, clip in clips.items()}


@pytest.fixture(autouse=True)
def _data_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve`'s default visits store is under $XDG_DATA_HOME: a test's own, never the
    user's (subprocesses inherit it)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))
