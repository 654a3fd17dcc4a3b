"""`agestream run IMAGE|FOLDER`: annotated copies and one JSON line per image, on real faces."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.config import OutputConfig
from stream.outputs import OutputError
from stream.overlay import HudStats, annotate
from stream.photos import PhotoOutputs, list_images, plan_outputs
from stream.sources import read_image
from stream.types import Estimates, Faces, Frame, FrameResult
from tests.conftest import SHARED, require
from tests.images import png_declaring

REPO = Path(__file__).resolve().parents[1]
FACES_DEV = SHARED / "data" / "faces" / "dev"
N_IMAGES = 20


def agestream(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m stream ARGS` from the repository root, so this checkout's code runs."""
    return subprocess.run(
        [sys.executable, "-m", "stream", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 face images spread over faces/dev (UTKFace and All-Age-Faces) and one corrupt file."""
    images = sorted(require(FACES_DEV).glob("*/*.jpg"))
    folder = tmp_path_factory.mktemp("photos") / "in"
    folder.mkdir()
    for i in np.linspace(0, len(images) - 1, N_IMAGES).round().astype(int):
        shutil.copy(images[i], folder / images[i].name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


@pytest.fixture(scope="module")
def labelled(photos: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder run once, into OUT beside it."""
    out = photos.parent / "out"
    return out, agestream("run", photos, "--output", out)


def test_given_a_folder_when_run_then_every_image_is_annotated_at_its_own_size(
    photos: Path, labelled: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out, completed = labelled
    assert completed.returncode == 0, completed.stderr
    originals = sorted(p.name for p in photos.iterdir() if p.name != "corrupt.jpg")
    assert len(originals) == N_IMAGES
    assert sorted(p.name for p in out.glob("*.jpg")) == originals
    assert not list(out.glob("*.partial.*"))
    for name in originals:
        assert cv2.imread(str(out / name)).shape == cv2.imread(str(photos / name)).shape


def test_given_a_folder_when_run_then_one_json_line_per_image_with_video_face_fields(
    photos: Path, labelled: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out, completed = labelled
    records = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == sorted(p.name for p in out.glob("*.jpg"))
    assert sum(len(r["faces"]) >= 1 for r in records) >= 18
    video_fields = {
        "box", "score", "age", "gender", "p_male", "track", "age_uncertainty", "age_raw",
        "p_male_raw", "age_std_raw", "age_low", "age_high", "age_low_raw", "age_high_raw",
        "quality",
    }  # fmt: skip
    for record in records:
        height, width = cv2.imread(str(photos / record["image"])).shape[:2]
        assert (record["width"], record["height"]) == (width, height)
        for face in record["faces"]:
            assert set(face) == video_fields
            assert 0 <= face["age"] <= 100 and face["gender"] in ("female", "male", "unsure")
    assert (
        f"{N_IMAGES} images, {sum(len(r['faces']) for r in records)} faces, 1 skipped (unreadable "
        "or too large); "
        f"wrote {out} ({N_IMAGES} images) and {out / 'faces.jsonl'} ({N_IMAGES} lines)"
    ) in completed.stderr


def test_given_a_folder_when_run_then_labels_are_drawn_on_each_face(
    photos: Path, labelled: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out, _ = labelled
    for line in (out / "faces.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not record["faces"]:
            continue
        x1, y1, x2, y2 = (round(v) for v in record["faces"][0]["box"])
        original = cv2.imread(str(photos / record["image"])).astype(int)
        annotated = cv2.imread(str(out / record["image"])).astype(int)
        # The box's outline (and the label above it) changes far more than JPEG's re-encoding.
        region = np.s_[max(y1 - 2, 0) : y2 + 3, max(x1 - 2, 0) : x2 + 3]
        changed = (np.abs(annotated[region] - original[region]).max(axis=2) > 60).sum()
        assert changed > 2 * (x2 - x1), record["image"]


def test_given_a_corrupt_image_then_it_is_skipped_with_a_warning(
    labelled: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, completed = labelled
    assert "WARNING skipping corrupt.jpg: not a readable image" in completed.stderr
    assert not (out / "corrupt.jpg").exists()


def test_given_outputs_of_an_earlier_run_when_run_again_then_nothing_is_overwritten(
    photos: Path, labelled: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out, _ = labelled
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    completed = agestream("run", photos, "--output", out, timeout=60)
    assert completed.returncode == 1
    first = sorted(p.name for p in photos.glob("*.jpg") if p.name != "corrupt.jpg")[0]
    assert completed.stderr.strip().splitlines()[-1] == (
        f"agestream: error: {out / first} already exists (as do {N_IMAGES} more outputs); "
        "agestream does not overwrite it: add --resume to continue the run that wrote it (images "
        "with outputs are skipped), or choose another --output folder or --json file"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_given_the_input_folder_as_output_then_refused_and_originals_kept(photos: Path) -> None:
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    completed = agestream("run", photos, "--output", photos, timeout=60)
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"agestream: error: --output {photos} is the input folder: the annotated images would "
        "overwrite the originals; choose another folder"
    )
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_given_one_photo_when_run_then_it_is_annotated_with_its_json_line(
    photos: Path, tmp_path: Path
) -> None:
    photo = sorted(photos.glob("*.jpg"))[0]
    completed = agestream(
        "run", photo, "--output", tmp_path / "one", "--json", tmp_path / "f.jsonl"
    )
    assert completed.returncode == 0, completed.stderr
    assert [p.name for p in (tmp_path / "one").iterdir()] == [photo.name]
    (record,) = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert record["image"] == photo.name and len(record["faces"]) == 1


def test_given_a_video_name_as_output_for_images_then_refused(tmp_path: Path) -> None:
    images = [tmp_path / "a.png"]
    with pytest.raises(OutputError, match=r"out\.mp4 is a video file name, but .* is images"):
        plan_outputs(OutputConfig(video=str(tmp_path / "out.mp4")), images, images[0])


def test_given_no_images_in_a_folder_then_error_says_which_files_count(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no images in .*: expected files ending in .jpg"):
        list_images(tmp_path)


def test_given_json_onto_an_input_image_then_refused(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    with pytest.raises(OutputError, match="is the same file as the input"):
        plan_outputs(OutputConfig(json=str(image)), [image], tmp_path)
    assert plan_outputs(OutputConfig(json="-"), [image], tmp_path) == PhotoOutputs(None, "-")


def test_given_no_hud_stats_then_annotate_draws_no_hud() -> None:
    def blank() -> FrameResult:
        empty = np.zeros((0,), np.float32)
        frame = Frame(np.zeros((240, 320, 3), np.uint8), 0, 0.0, "still")
        return FrameResult(frame, Faces.empty(), Estimates(empty, empty, empty), t_ms=0.0)

    assert not annotate(blank(), None).any()
    assert annotate(blank(), HudStats(30.0, 30.0, 0)).any()


def test_given_the_same_dev_faces_then_evaluate_scores_exactly_what_run_shows(
    tmp_path: Path,
) -> None:
    """One path from image to estimate: `evaluate` and `run FOLDER` give every face the same
    age and P(male), padding included for faces that fill their image."""
    images = sorted(require(SHARED / "data" / "utkface-dev").glob("*.jpg"))
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in np.linspace(0, len(images) - 1, 24).round().astype(int):
        shutil.copy(images[i], folder / images[i].name)
    report, lines = tmp_path / "report.json", tmp_path / "faces.jsonl"
    assert agestream("evaluate", folder, "--json", report).returncode == 0
    assert agestream("run", folder, "--json", lines).returncode == 0
    scored = {Path(row["file"]).name: row for row in json.loads(report.read_text())["per_image"]}
    shown = {}
    for record in map(json.loads, lines.read_text().splitlines()):
        middle = np.array([record["width"], record["height"]]) / 2
        faces = [face for face in record["faces"] if face["track"] is not None]
        if faces:
            centres = [np.subtract(f["box"][2:], f["box"][:2]) / 2 + f["box"][:2] for f in faces]
            nearest = faces[int(np.argmin([np.linalg.norm(c - middle) for c in centres]))]
            shown[record["image"]] = {"age": nearest["age"], "p_male": nearest["p_male"]}
    assert len(shown) >= 22, "nearly every dev face is found and shown"
    assert set(shown) == {name for name, row in scored.items() if row["age"] is not None}
    for name, face in shown.items():
        assert (face["age"], face["p_male"]) == (scored[name]["age"], scored[name]["p_male"]), name


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """7 images: 4 real faces (a1-a3, d4) and, sorted among them, a 68-byte PNG declaring
    100000 x 100000 pixels, one declaring 30000 x 30000, and a 10 x 10 PNG of garbage."""
    faces = sorted(require(FACES_DEV).glob("aaf/*.jpg"))[:4]
    folder = tmp_path / "in"
    folder.mkdir()
    for face, name in zip(faces, ("a1.jpg", "a2.jpg", "a3.jpg", "d4.jpg")):
        shutil.copy(face, folder / name)
    (folder / "b-bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (folder / "b-huge.png").write_bytes(png_declaring(30_000, 30_000))
    (folder / "c-broken.png").write_bytes(png_declaring(10, 10, b"not zlib data"))
    return folder


LABELLED = ["a1.jpg", "a2.jpg", "a3.jpg", "d4.jpg"]
SKIPPED = [
    "WARNING skipping b-bomb.png: 100000x100000 pixels, more than the 268-megapixel limit for "
    "images",
    "WARNING skipping b-huge.png: 30000x30000 pixels, more than the 268-megapixel limit for images",
    "WARNING skipping c-broken.png: not a readable image",
]


def test_given_huge_and_broken_images_in_a_folder_then_they_are_skipped_and_the_rest_labelled(
    mixed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    completed = agestream("run", mixed, "--output", out)
    assert completed.returncode == 0, completed.stderr
    for warning in SKIPPED:
        assert warning in completed.stderr
    assert sorted(p.name for p in out.iterdir()) == [*LABELLED, "faces.jsonl"]
    records = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == LABELLED
    faces = sum(len(r["faces"]) for r in records)
    assert completed.stderr.strip().splitlines()[-1] == (
        f"4 images, {faces} faces, 3 skipped (unreadable or too large); wrote {out} (4 images) "
        f"and {out / 'faces.jsonl'} (4 lines)"
    )


def test_given_an_image_declaring_10_gigapixels_then_it_is_skipped_before_decoding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(100_000, 100_000))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert read_image(bomb, "bomb.png") is None
    assert time.monotonic() - started < 1.0
    assert caplog.messages == [
        "skipping bomb.png: 100000x100000 pixels, more than the 268-megapixel limit for images"
    ]


def test_given_opencv_failing_on_an_image_then_it_is_a_logged_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever OpenCV raises for one image (its own size limit, a codec assertion) skips it."""
    image = tmp_path / "a.png"
    assert cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))

    def failing(*args: object) -> None:
        raise cv2.error("OpenCV(5.1.0) loadsave.cpp:80: error: (-215:Assertion failed) oops")

    monkeypatch.setattr(cv2, "imread", failing)
    with caplog.at_level(logging.WARNING):
        assert read_image(image, "a.png") is None
    assert caplog.messages == [
        "skipping a.png: OpenCV cannot decode it (OpenCV(5.1.0) loadsave.cpp:80: error: "
        "(-215:Assertion failed) oops)"
    ]


def test_given_a_run_that_stopped_then_a_rerun_names_the_outputs_and_resume_finishes_it(
    mixed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert agestream("run", mixed, "--output", out, "--max-frames", "2").returncode == 0
    before = {name: (out / name).stat().st_mtime_ns for name in ("a1.jpg", "a2.jpg")}
    refused = agestream("run", mixed, "--output", out, timeout=60)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"agestream: error: {out / 'a1.jpg'} already exists (as do 2 more outputs); agestream "
            "does not overwrite it: add --resume"
        )
    )
    resumed = agestream("run", mixed, "--output", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert ", 3 skipped (unreadable or too large), 2 done by an earlier run; wrote" in (
        resumed.stderr
    )
    records = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in records) == LABELLED
    assert sorted(p.name for p in out.iterdir()) == [*LABELLED, "faces.jsonl"]
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before


def test_given_json_onto_another_photo_then_refused_and_the_photo_kept(
    photos: Path, tmp_path: Path
) -> None:
    first, second = sorted(photos.glob("*.jpg"))[:2]
    a1, a2 = shutil.copy(first, tmp_path / "a1.jpg"), shutil.copy(second, tmp_path / "a2.jpg")
    kept = a2.read_bytes()
    completed = agestream("run", a1, "--output", tmp_path / "out", "--json", a2, timeout=60)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"agestream: error: {a2} already exists; agestream does not overwrite it: add --resume "
        "to continue the run that wrote it (images with outputs are skipped), or choose another "
        "--output folder or --json file"
    ]
    resumed = agestream("run", a1, "--output", tmp_path / "out", "--json", a2, "--resume")
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"agestream: error: {a2}:1: not a JSON line of agestream run on images, so there is "
        "nothing to resume; choose another --json file"
    )
    assert a2.read_bytes() == kept and not (tmp_path / "out").exists()


def test_given_json_onto_an_annotated_copy_then_refused(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"annotated copy of a\.jpg .* is the same file as"):
        plan_outputs(OutputConfig(video=str(out), json=str(out / "a.jpg")), [image], image)
