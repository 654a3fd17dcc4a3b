"""A careless or hostile user's cases (issue 11): outputs onto inputs, full disks, kill -9,
concurrent runs, corrupt and variable-frame-rate files, file URLs, huge images, bad reports,
noise and Ctrl-C. Each runs the real `agestream` command on real clips."""

from __future__ import annotations

import csv
import fractions
import functools
import http.server
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from stream.outputs import partial_path
from tests.conftest import (
    HAMILTON,
    UTKFACE,
    VIDEOS,
    decoded_frame_count,
    frame_records,
    require,
    wait_for,
)

S32 = VIDEOS / "livePortrait__source__s32.mp4"  # 180 frames, 1280x720, 30 FPS, one face
RUN_TIMEOUT_S = 240


def agestream(*args: str, timeout: float = RUN_TIMEOUT_S, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("agestream: ")]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hamilton clip six times over (~55 s, 640x360): a run that lasts while a test
    signals or kills it."""
    capture = cv2.VideoCapture(str(require(HAMILTON)))
    images = []
    while (image := capture.read()[1]) is not None:
        images.append(image)
    capture.release()
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for image in images * 6:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode())
    return path


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# Case 1: an output onto the input, or two outputs onto one file.
@pytest.mark.parametrize("flags", [("--output",), ("--json",), ("--tracks",)])
def test_given_output_onto_the_source_then_refused_and_source_intact(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    source = tmp_path / "same.mp4"
    shutil.copy(require(S32), source)
    before = source.read_bytes()
    link = tmp_path / "link.mp4"
    link.symlink_to(source)
    for target in (source, link):
        result = agestream("run", str(source), "--no-window", flags[0], str(target))
        assert result.returncode == 1, result.stderr
        (line,) = error_lines(result.stderr)
        assert "same file as the input" in line and str(target) in line
    assert source.read_bytes() == before


def test_given_two_outputs_onto_one_file_then_refused(tmp_path: Path) -> None:
    target = tmp_path / "x"
    result = agestream(
        "run", str(require(S32)), "--no-window", "--json", str(target), "--output", str(target)
    )
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "same file as" in line
    assert not target.exists()


# Case 2: a disk that fills mid-run (a file size limit gives the same EFBIG path).
def _file_size_limit(limit_bytes: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.parametrize(
    "flag,name,limit_bytes", [("--output", "x.mp4", 300_000), ("--json", "x.jsonl", 30_000)]
)
def test_given_full_disk_when_writing_then_run_fails_naming_file_and_keeps_whole_part(
    tmp_path: Path, flag: str, name: str, limit_bytes: int
) -> None:
    target = tmp_path / name
    result = agestream(
        "run", str(require(S32)), "--no-window", flag, str(target),
        preexec_fn=functools.partial(_file_size_limit, limit_bytes),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert any("cannot write" in line and "EFBIG" in line for line in error_lines(result.stderr))
    assert f"wrote {target}" not in result.stderr
    assert "NOT written" in result.stderr
    assert not target.exists()
    kept = partial_path(target)
    if name.endswith(".mp4"):
        assert decoded_frame_count(kept) >= 10
    else:
        lines = kept.read_text().split("\n")
        assert lines[-1] == "" and len(lines) > 10  # whole lines only
        assert all(json.loads(line)["t_ms"] >= 0 for line in lines[:-1])


# Case 3: SIGKILL mid-run leaves a playable video and valid JSON lines up to the kill.
def test_given_sigkill_mid_run_then_video_plays_to_near_the_kill_and_lines_are_valid(
    tmp_path: Path, long_clip: Path
) -> None:
    video, jsonl = tmp_path / "k.mp4", tmp_path / "k.jsonl"
    process = start(
        "run", str(long_clip), "--no-window", "--output", str(video), "--json", str(jsonl)
    )
    try:
        wait_for(lambda: complete_lines(partial_path(jsonl)) >= 150, what="150 JSON lines")
    finally:
        process.kill()
        process.communicate(timeout=30)
    lines = partial_path(jsonl).read_bytes().split(b"\n")
    records = [json.loads(line) for line in lines[:-1]]  # every complete line is valid
    written = len(records)
    fps = 30
    # The video is fragmented at each keyframe (one a second) and synced every 2 s.
    assert written - 3 * fps <= decoded_frame_count(partial_path(video)) <= written + 1


# Case 4: a second run onto the same outputs is refused while the first writes them.
def test_given_run_writing_outputs_when_second_run_targets_them_then_refused(
    tmp_path: Path, long_clip: Path
) -> None:
    jsonl = tmp_path / "c.jsonl"
    first = start("run", str(long_clip), "--no-window", "--json", str(jsonl))
    try:
        wait_for(lambda: complete_lines(partial_path(jsonl)) >= 5, what="the first run's lines")
        second = agestream("run", str(require(S32)), "--no-window", "--json", str(jsonl))
        first.send_signal(signal.SIGINT)
        _, first_stderr = first.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        first.kill()
    assert second.returncode == 1
    (line,) = error_lines(second.stderr)
    assert "being written by another agestream run" in line
    assert first.returncode == 130, first_stderr
    records = frame_records(jsonl)
    assert [record["frame"] for record in records] == list(range(len(records)))


# Case 5: the tracks CSV describes exactly the frames written.
def test_given_max_frames_then_tracks_csv_counts_the_frames_written(tmp_path: Path) -> None:
    tracks, jsonl = tmp_path / "t.csv", tmp_path / "t.jsonl"
    result = agestream(
        "run", str(require(S32)), "--no-window", "--max-frames", "20",
        "--tracks", str(tracks), "--json", str(jsonl),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = frame_records(jsonl)
    seen: dict[int, int] = {}
    for record in records:
        for face in record["faces"]:
            if face["track"] is not None:  # unconfirmed faces are no one's yet
                seen[face["track"]] = seen.get(face["track"], 0) + 1
    with tracks.open() as file:
        rows = {int(row["track_id"]): int(row["frames_seen"]) for row in csv.DictReader(file)}
    assert len(records) == 20 and rows == seen and seen


# Case 6: bytes corrupted mid-file: the bad frames are skipped and counted, the rest read.
def test_given_corrupt_middle_when_run_then_bad_frames_skipped_and_rest_read(
    tmp_path: Path,
) -> None:
    data = bytearray(require(S32).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 65536] = bytes(65536)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    jsonl = tmp_path / "c.jsonl"
    result = agestream("run", str(corrupt), "--no-window", "--json", str(jsonl))
    assert result.returncode == 0, result.stderr
    times_ms = [record["t_ms"] for record in frame_records(jsonl)]
    skipped = int(result.stderr.split(" undecodable frames skipped")[0].rsplit(", ", 1)[1])
    assert skipped > 0 and len(times_ms) + skipped == 180
    assert max(times_ms) == pytest.approx(179 * 1000 / 30, abs=1)  # read on to the end


# Case 7: a variable-frame-rate file: t_ms is each frame's time in the file.
def test_given_vfr_file_when_run_then_t_ms_are_the_container_times(tmp_path: Path) -> None:
    capture = cv2.VideoCapture(str(require(S32)))
    images = [capture.read()[1] for _ in range(40)]
    capture.release()
    # 30 frames in the first second, then 10 frames one a second apart.
    times_ms = [i * 1000 // 30 for i in range(30)] + [1000 * (i + 1) for i in range(10)]
    vfr = tmp_path / "vfr.mp4"
    with av.open(str(vfr), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for image, t_ms in zip(images, times_ms):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts, frame.time_base = t_ms, fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    jsonl = tmp_path / "v.jsonl"
    result = agestream("run", str(vfr), "--no-window", "--json", str(jsonl))
    assert result.returncode == 0, result.stderr
    got = [record["t_ms"] for record in frame_records(jsonl)]
    assert np.allclose(got, times_ms, atol=2)


# Case 8: a plain file over HTTP ends with the file; file:// URLs work.
class RangeFileHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server with byte ranges, as every real web server has: an mp4 whose
    index is at its end cannot be read without them (Python's own server lacks them)."""

    def send_head(self):
        ranges = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not ranges.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first_text, _, last_text = ranges.removeprefix("bytes=").partition("-")
        first, last = int(first_text), int(last_text) if last_text else size - 1
        file = path.open("rb")
        file.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        return file

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    shutil.copy(require(S32), tmp_path / "s32.mp4")
    handler = functools.partial(RangeFileHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_given_http_url_of_a_file_when_run_then_it_ends_with_the_file(
    http_root: str, tmp_path: Path
) -> None:
    jsonl = tmp_path / "h.jsonl"
    result = agestream(
        "run", f"{http_root}/s32.mp4", "--no-window", "--json", str(jsonl), timeout=120
    )
    assert result.returncode == 0, result.stderr
    frames = [record["frame"] for record in frame_records(jsonl)]
    assert frames == list(range(180))


def test_given_file_url_when_run_then_the_file_is_read(tmp_path: Path) -> None:
    jsonl = tmp_path / "f.jsonl"
    url = require(S32).resolve().as_uri()
    result = agestream("run", url, "--no-window", "--max-frames", "3", "--json", str(jsonl))
    assert result.returncode == 0, result.stderr
    assert len(frame_records(jsonl)) == 3


# Case 9 and 11: a huge image is evaluated downscaled; nothing scored gives null, not NaN.
def test_given_huge_image_when_evaluated_then_downscaled_and_strict_json(tmp_path: Path) -> None:
    folder = tmp_path / "huge"
    folder.mkdir()
    image = np.full((16000, 16000, 3), 128, np.uint8)
    assert cv2.imwrite(str(folder / "30_0_0_20170101000000000.jpg"), image)
    del image
    report = tmp_path / "r.json"
    result = agestream("evaluate", str(folder), "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "beyond any camera's size" in result.stderr
    parsed = json.loads(report.read_text(), parse_constant=pytest.fail)
    assert parsed["detected"] == 0 and parsed["age_mae"] is None


# Case 11: evaluate-video reports.
def _run_lines(tmp_path: Path) -> list[str]:
    jsonl = tmp_path / "run.jsonl"
    result = agestream("run", str(require(S32)), "--no-window", "--max-frames", "30",
                       "--json", str(jsonl))  # fmt: skip
    assert result.returncode == 0, result.stderr
    return jsonl.read_text().splitlines()


def test_given_reports_when_evaluated_then_strict_json_partial_tail_and_named_lines(
    tmp_path: Path,
) -> None:
    lines = _run_lines(tmp_path)
    empty, killed, broken = (tmp_path / name for name in ("e.jsonl", "k.jsonl", "b.jsonl"))
    empty.write_text("")
    killed.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    broken.write_text("\n".join([*lines[:5], lines[5][:20], *lines[6:]]) + "\n")

    report = tmp_path / "r.json"
    result = agestream("evaluate-video", str(killed), "--reference", str(empty),
                       "--json", str(report))  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The start record, then 30 frames: the cut one is line 31.
    assert f"{killed}:31" in result.stderr and "partial last line" in result.stderr
    parsed = json.loads(report.read_text(), parse_constant=pytest.fail)
    assert parsed["reference"]["mean_abs_age_diff"] is None

    result = agestream("evaluate-video", str(broken))
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert f"{broken}:6: not JSON" in line

    result = agestream("evaluate-video", str(killed), "--json", "-")
    assert json.loads(result.stdout)["tracks"] >= 1
    assert not (Path.cwd() / "-").exists()


# Case 12: quiet by default, one line for bad flags and unwritable outputs.
def test_given_plain_run_then_only_agestream_lines_and_native_noise_with_verbose(
    tmp_path: Path,
) -> None:
    quiet = agestream("run", str(require(S32)), "--no-window", "--max-frames", "2")
    verbose = agestream("run", str(require(S32)), "--no-window", "--max-frames", "2", "-v")
    for noise in ("InitGoogle", "not aligned"):
        assert noise not in quiet.stderr
        assert any(noise in line and " DEBUG " in line for line in verbose.stderr.splitlines())
    assert quiet.returncode == verbose.returncode == 0


def test_given_negative_limit_then_one_usage_line() -> None:
    result = agestream("evaluate", str(require(UTKFACE)), "--limit", "-3")
    assert result.returncode == 2
    assert "--limit: expected a whole number of at least 1, got '-3'" in result.stderr
    assert "Traceback" not in result.stderr


def test_given_unwritable_output_folder_then_one_line_naming_it(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys/kernel/agestream.mp4")  # root may write any folder but sysfs
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        target = folder / "x.mp4"
    result = agestream("run", str(require(S32)), "--no-window", "--output", str(target))
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"agestream: error: cannot write video {target}: Permission denied (EACCES)"
    ]


def test_given_ctrl_c_while_starting_then_no_traceback() -> None:
    process = start("run", str(require(S32)), "--no-window")
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr


def test_given_two_ctrl_c_mid_run_then_summary_with_wrote_lines(
    tmp_path: Path, long_clip: Path
) -> None:
    jsonl = tmp_path / "i.jsonl"
    process = start("run", str(long_clip), "--no-window", "--json", str(jsonl))
    try:
        wait_for(lambda: complete_lines(partial_path(jsonl)) >= 5, what="5 JSON lines")
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    written = jsonl.read_text().count("\n")
    assert process.returncode == 130, stderr
    assert f": {written - 1} frames in " in stderr, "every line but the start record is a frame"
    assert f"wrote {jsonl} ({written} lines)" in stderr
    assert "Traceback" not in stderr
