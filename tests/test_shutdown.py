"""SIGINT and SIGTERM mid-run: prompt stop, playable video, whole JSON lines, a summary."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream.outputs import partial_path
from tests.conftest import HAMILTON, decoded_frame_count, frame_records, require

# Within 2 s of the signal the summary is printed (all outputs finalized) and the process
# has exited. (mediapipe would import TensorFlow, whose teardown alone takes ~1.5 s; the
# detector hides it, see detectors/mediapipe.py.)
SUMMARY_LIMIT_S = 2.0
EXIT_LIMIT_S = 2.0


@dataclass(frozen=True)
class Stopped:
    returncode: int
    summary_s: float
    exit_s: float
    stderr: str


def interrupt(process: subprocess.Popen[str], signum: int) -> Stopped:
    """Send `signum` to a running `agestream run` (stderr piped) and time its stop."""
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stderr:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent_at = time.monotonic()
    process.send_signal(signum)
    process.wait(timeout=20)
    exit_s = time.monotonic() - sent_at
    reader.join(timeout=5)
    summary_at = next((at for at, line in lines if " frames in " in line), float("inf"))
    return Stopped(
        process.returncode, summary_at - sent_at, exit_s, "".join(line for _, line in lines)
    )


def wait_for_lines(path: Path, count: int, timeout_s: float = 90.0) -> None:
    """Wait until the run has written `count` lines (to the partial file it renames when done)."""
    deadline = time.monotonic() + timeout_s
    path = partial_path(path)
    while not (path.exists() and path.read_text().count("\n") >= count):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} JSON lines in {path} after {timeout_s} s")
        time.sleep(0.02)


def _file_source(tmp_path: Path) -> str:
    return str(require(HAMILTON))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("live", [False, True], ids=["file", "rtsp"])
def test_given_running_pipeline_when_signalled_then_stops_fast_with_whole_outputs(
    tmp_path: Path, signum: int, live: bool, request: pytest.FixtureRequest
) -> None:
    if live:
        from tests.test_rtsp import RtspServer, _has_gst_rtsp_server

        if not _has_gst_rtsp_server():
            pytest.skip("needs GStreamer's RTSP server (see tests/test_rtsp.py)")
        server = RtspServer(require(HAMILTON))
        server.start()
        request.addfinalizer(server.kill)
        source = server.url()
    else:
        source = _file_source(tmp_path)
    video, jsonl = tmp_path / "o.mp4", tmp_path / "o.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "stream", "run", source, "--no-window",
         "--output", str(video), "--json", str(jsonl)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for_lines(jsonl, 2)  # the start record and a frame
        stopped = interrupt(process, signum)
    finally:
        process.kill()

    records = frame_records(jsonl)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.summary_s < SUMMARY_LIMIT_S
    assert stopped.exit_s < EXIT_LIMIT_S
    assert "(interrupted)" in stopped.stderr
    assert f"{len(records)} frames in " in stopped.stderr
    assert len(records) >= 1 and all("frame" in record for record in records)
    assert decoded_frame_count(video) == len(records)
