"""End to end: `agestream run` with --blur, output.hud false, several sources or a glob, and
its output piped into a reader that goes away (`| head`)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.config import ConfigError
from stream.several import expand_sources
from tests.conftest import HAMILTON, VIDEOS, decoded_frame_count, frame_records, require

SECOND_CLIP = VIDEOS / "livePortrait__driving__d19.mp4"
THIRD_CLIP = VIDEOS / "livePortrait__source__s18.mp4"
FRAMES = 30  # HAMILTON's performer walks in at frame 20
# Decoded video frames are compared in this corner, far from any face of the first FRAMES.
FAR_ROWS, FAR_COLUMNS = slice(250, 350), slice(10, 150)
# Rows 0 to this hold the rates line (the HUD) at HAMILTON's 640x360.
HUD_ROWS = 30
HUD_BAND = (slice(0, HUD_ROWS), slice(0, 400))
NEAR_WHITE = 230
RUN_TIMEOUT_S = 120.0


def agestream(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args], capture_output=True, text=True, timeout=timeout
    )


def video_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    return frames


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian: fine detail, which a blur removes."""
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def inside_face(box: list[float]) -> tuple[slice, slice]:
    """The middle of a face box: clear of its outline, of a label drawn inside its top, and of
    the HUD's rows."""
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    top = max(int(y1 + 0.4 * height), HUD_ROWS + 10)
    return slice(top, int(y2 - 0.15 * height)), slice(
        int(x1 + 0.25 * width), int(x2 - 0.25 * width)
    )


def near_white(image: np.ndarray) -> int:
    return int((image >= NEAR_WHITE).all(axis=2).sum())


def run_clip(folder: Path, *options: str) -> tuple[list[np.ndarray], list[dict]]:
    """The first FRAMES of HAMILTON run with `options`: its decoded video and frame records."""
    folder.mkdir(parents=True, exist_ok=True)
    video, records = folder / "run.mp4", folder / "run.jsonl"
    done = agestream(
        "run", str(require(HAMILTON)), "--no-window", "--max-frames", str(FRAMES),
        "--output", str(video), "--json", str(records), *options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return video_frames(video), frame_records(records)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], list[dict]]:
    """HAMILTON's first frames as `run` writes them by default: no blur, with the HUD."""
    return run_clip(tmp_path_factory.mktemp("plain"))


def test_given_blur_when_run_then_faces_lose_their_detail_and_the_rest_is_untouched(
    tmp_path: Path, plain_run: tuple[list[np.ndarray], list[dict]]
) -> None:
    plain, _ = plain_run
    blurred, records = run_clip(tmp_path, "--blur")
    assert len(blurred) == len(plain) == FRAMES

    faces = [(record["frame"], face["box"]) for record in records for face in record["faces"]]
    assert len(faces) >= 10, "the clip's first frames have faces to blur"
    inside_plain = sum(sharpness(plain[i][inside_face(box)]) for i, box in faces)
    inside_blurred = sum(sharpness(blurred[i][inside_face(box)]) for i, box in faces)
    assert inside_blurred < inside_plain / 5

    for frame, box in faces:  # the compared corner holds no face
        x1, y1, x2, y2 = box
        assert x1 > FAR_COLUMNS.stop or y2 < FAR_ROWS.start, (frame, box)
    far_plain = sum(sharpness(image[FAR_ROWS, FAR_COLUMNS]) for image in plain)
    far_blurred = sum(sharpness(image[FAR_ROWS, FAR_COLUMNS]) for image in blurred)
    assert 0.7 < far_blurred / far_plain < 1.4
    for before, after in zip(plain, blurred, strict=True):  # only the encoder's noise differs
        difference = np.abs(
            before[FAR_ROWS, FAR_COLUMNS].astype(int) - after[FAR_ROWS, FAR_COLUMNS]
        )
        assert difference.mean() < 4


def test_given_blur_when_an_image_is_run_then_its_copy_has_the_face_blurred(
    tmp_path: Path,
) -> None:
    capture = cv2.VideoCapture(str(require(HAMILTON)))
    capture.set(cv2.CAP_PROP_POS_FRAMES, 25)  # the performer, large and frontal
    ok, still = capture.read()
    capture.release()
    assert ok
    image = tmp_path / "stage.png"
    cv2.imwrite(str(image), still)
    out = tmp_path / "out"

    done = agestream("run", str(image), "--output", str(out), "--blur")

    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    assert record["faces"], "the performer is found"
    copy = cv2.imread(str(out / "stage.png"))
    assert copy is not None, "the labelled copy is written under the image's name"
    for face in record["faces"]:
        region = inside_face(face["box"])
        assert sharpness(copy[region]) < sharpness(still[region]) / 5
    assert np.array_equal(copy[FAR_ROWS, FAR_COLUMNS], still[FAR_ROWS, FAR_COLUMNS])


def test_given_hud_false_when_run_then_no_rates_line_is_drawn(
    tmp_path: Path, plain_run: tuple[list[np.ndarray], list[dict]]
) -> None:
    config = tmp_path / "no_hud.yaml"
    config.write_text("output: {hud: false}\n")
    capture = cv2.VideoCapture(str(require(HAMILTON)))
    ok, source = capture.read()
    capture.release()
    assert ok

    without_hud, _ = run_clip(tmp_path, "--config", str(config))

    with_hud = plain_run[0][0]
    source_band = source[HUD_BAND].astype(int)
    assert near_white(with_hud[HUD_BAND]) > near_white(source[HUD_BAND]) + 200, "the HUD's text"
    assert np.abs(with_hud[HUD_BAND] - source_band).mean() > 20
    assert near_white(without_hud[0][HUD_BAND]) <= near_white(source[HUD_BAND]) + 20
    assert np.abs(without_hud[0][HUD_BAND] - source_band).mean() < 4


def summary_starts(stderr: str, names: list[str]) -> list[int]:
    """Where each source's run summary ("SOURCE: N frames in ...") starts in `stderr`."""
    starts = []
    for name in names:
        summaries = [line for line in stderr.splitlines() if f"{name}: 10 frames in" in line]
        assert len(summaries) == 1, stderr
        starts.append(stderr.index(summaries[0]))
    return starts


def test_given_a_clip_and_a_quoted_glob_when_run_then_each_writes_its_own_outputs_in_order(
    tmp_path: Path,
) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    # Made in the reverse of their sorted order.
    (clips / "b_d19.mp4").symlink_to(require(SECOND_CLIP))
    (clips / "a_s18.mp4").symlink_to(require(THIRD_CLIP))
    (clips / "notes.txt").write_text("not a clip")
    out = tmp_path / "out"

    done = agestream(
        "run", str(require(HAMILTON)), str(clips / "*.mp4"), "--no-window", "--max-frames", "10",
        "--output", str(out), "--json", str(out), "--tracks", str(out),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    stems = [HAMILTON.stem, "a_s18", "b_d19"]
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in stems for suffix in (".csv", ".jsonl", ".mp4")
    )
    for stem in stems:
        assert decoded_frame_count(out / f"{stem}.mp4") == 10
        assert [r["frame"] for r in frame_records(out / f"{stem}.jsonl")] == list(range(10))
        assert (out / f"{stem}.csv").read_text().strip(), "the tracks CSV has its header"
    given = [str(HAMILTON), str(clips / "a_s18.mp4"), str(clips / "b_d19.mp4")]
    starts = summary_starts(done.stderr, given)
    assert starts == sorted(starts), "the clip, then the pattern's matches sorted"


def test_given_patterns_and_names_then_patterns_expand_sorted_in_place(tmp_path: Path) -> None:
    names = ["e", "c", "a", "f", "b", "d"]  # made unsorted; a directory lists them in any order
    for name in names:
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    (tmp_path / "z.avi").write_bytes(b"")
    given = ["0", str(tmp_path / "*.mp4"), str(tmp_path / "z.avi")]

    sources = expand_sources(given)

    matches = [str(tmp_path / f"{name}.mp4") for name in sorted(names)]
    assert sources == ["0", *matches, str(tmp_path / "z.avi")]


def test_given_a_url_with_a_query_then_it_is_a_source_not_a_pattern() -> None:
    url = "rtsp://127.0.0.1:9/cam?channel=1&subtype=0"

    assert expand_sources([url, "http://127.0.0.1:9/video.mjpg?size=[640]"]) == [
        url,
        "http://127.0.0.1:9/video.mjpg?size=[640]",
    ]


def test_given_an_image_among_several_sources_then_a_config_error_names_it(
    tmp_path: Path,
) -> None:
    image = tmp_path / "face.jpg"
    image.write_bytes(b"")

    with pytest.raises(ConfigError, match="face.jpg"):
        expand_sources([str(require(HAMILTON)), str(image)])


def test_given_several_sources_and_a_video_file_output_then_exit_2_naming_the_folder_rule(
    tmp_path: Path,
) -> None:
    done = agestream(
        "run", str(require(HAMILTON)), str(require(SECOND_CLIP)), "--no-window",
        "--max-frames", "1", "--output", str(tmp_path / "out.mp4"), timeout=60,
    )  # fmt: skip

    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "out.mp4" in line and "several sources it is a folder" in line, line
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_given_a_pattern_matching_nothing_then_exit_2_naming_it(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.mp4")

    done = agestream("run", pattern, "--no-window", "--json", str(tmp_path / "o.jsonl"), timeout=60)

    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert pattern in line and "matches no file" in line, line


def test_given_a_missing_source_among_two_then_the_other_is_written_and_exit_1(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing.mp4"
    out = tmp_path / "out"

    done = agestream(
        "run", str(missing), str(require(HAMILTON)), "--no-window", "--max-frames", "10",
        "--output", str(out), "--json", str(out),
    )  # fmt: skip

    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("agestream: error:")]
    assert len(errors) == 1 and str(missing) in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert decoded_frame_count(out / f"{HAMILTON.stem}.mp4") == 10
    assert len(frame_records(out / f"{HAMILTON.stem}.jsonl")) == 10
    assert sorted(path.stem for path in out.iterdir()) == [HAMILTON.stem] * 2, "none for missing"


def test_given_stdout_reader_goes_away_then_the_run_ends_quietly_with_141() -> None:
    command = [
        sys.executable, "-m", "stream", "run", str(require(HAMILTON)), "--no-window",
        "--json", "-", "--max-frames", "200",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = process.stdout
    assert stdout is not None
    try:
        readable, _, _ = select.select([stdout], [], [], RUN_TIMEOUT_S)
        assert readable, "the run wrote nothing to standard output"
        first = json.loads(stdout.readline())
        assert first["event"] == "start"
        stdout.close()  # as `head -1` does after its line
        _, stderr = process.communicate(timeout=30)  # it ends soon after
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    assert process.returncode == 141, stderr.decode()
    for noise in (b"Traceback", b"BrokenPipeError", b"Exception ignored"):
        assert noise not in stderr, stderr.decode()
