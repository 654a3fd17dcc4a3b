"""Face chips for training, cut by the pipeline's own detector and alignment, cached on disk.

Every image is padded as `evaluate` pads it, BlazeFace finds its face and the same
`cut_crops` the pipeline runs cuts a chip a little wider than the model's input, so that
augmentation can shift, scale and rotate it without inventing borders; the centre of a
chip at rest is exactly the model's crop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from estimators.base import CropSpec
from stream.config import DetectorConfig
from stream.faceset import LabelledImage, detect_on_canvas, load_labelled
from stream.sources import read_image

log = logging.getLogger(__name__)

# Images per task handed to a worker process.
CHUNK = 64


@dataclass(frozen=True)
class ChipSet:
    """Chips of one labelled folder, as column arrays; `names` are paths relative to it."""

    chips: np.ndarray  # (n, size, size, 3) uint8 RGB
    age: np.ndarray  # (n,) float32 years
    is_male: np.ndarray  # (n,) bool
    source: np.ndarray  # (n,) str, data set of each image
    names: np.ndarray  # (n,) str
    missed: int  # images where no face was found

    def __len__(self) -> int:
        return len(self.age)


def storage_spec(model_crop: CropSpec, border: int) -> CropSpec:
    """The stored chip: the model's crop plus `border` pixels of real context on every side."""
    if model_crop.align != "warp":
        raise ValueError(f"training needs a 'warp' crop, but got {model_crop.align!r}")
    size = model_crop.size + 2 * border
    # Same pixel pitch as the model's crop: (size - 1) chip pixels span margin x the face.
    margin = model_crop.margin * (size - 1) / (model_crop.size - 1)
    return CropSpec(size, "warp", margin)


_worker: dict = {}


def _start_worker(detector_config: DetectorConfig, models_dir: str | None) -> None:
    from detectors import create_detector

    # Padded 200 px crops are ~400 px wide, where `auto` picks short range, as in evaluate.
    _worker["detector"] = create_detector(detector_config, 400, models_dir)


def _cut(task: tuple[list[str], CropSpec]) -> list[np.ndarray | None]:
    from stream.analyzer import cut_crops

    paths, spec = task
    chips: list[np.ndarray | None] = []
    for path in paths:
        image = read_image(Path(path), path)
        if image is None:
            chips.append(None)
            continue
        canvas, faces = detect_on_canvas(
            _worker["detector"], cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        )
        chips.append(cut_crops(canvas, faces, spec)[0] if len(faces) else None)
    return chips


def cut_chips(
    images: list[LabelledImage],
    spec: CropSpec,
    detector_config: DetectorConfig,
    models_dir: str | None = None,
    workers: int = 2,
) -> ChipSet:
    """Detect and cut every image's face with `workers` processes (each its own detector;
    1 runs in this process)."""
    tasks = [
        ([str(i.path) for i in images[at : at + CHUNK]], spec)
        for at in range(0, len(images), CHUNK)
    ]
    if workers == 1:
        _start_worker(detector_config, models_dir)
        cut = [chip for task in tasks for chip in _cut(task)]
        _worker.pop("detector").close()
    else:
        context = multiprocessing.get_context("spawn")  # MediaPipe's graph does not survive fork
        with context.Pool(workers, _start_worker, (detector_config, models_dir)) as pool:
            cut = [chip for chunk in pool.imap(_cut, tasks) for chip in chunk]
    found = [(i, chip) for i, chip in enumerate(cut) if chip is not None]
    chips = (
        np.stack([chip for _, chip in found])
        if found
        else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    )
    kept = [images[i] for i, _ in found]
    return ChipSet(
        chips=chips,
        age=np.array([i.age for i in kept], np.float32),
        is_male=np.array([i.is_male for i in kept], bool),
        source=np.array([i.source for i in kept]),
        names=np.array([i.path.name for i in kept]),
        missed=len(images) - len(found),
    )


def _cache_key(
    directory: Path, spec: CropSpec, detector_config: DetectorConfig, limit: int | None
) -> str:
    labels = directory / "labels.csv"
    listing = (
        labels.read_bytes()
        if labels.is_file()
        else "\n".join(sorted(p.name for p in directory.glob("*.jpg"))).encode()
    )
    described = json.dumps([str(directory.resolve()), asdict(spec), asdict(detector_config), limit])
    return hashlib.sha1(listing + described.encode()).hexdigest()[:16]


def load_chips(
    directory: Path,
    spec: CropSpec,
    cache_dir: Path,
    detector_config: DetectorConfig,
    *,
    limit: int | None = None,
    models_dir: str | None = None,
    workers: int = 2,
) -> ChipSet:
    """The folder's chips from the cache, cutting and caching them on first use."""
    cache = (
        cache_dir
        / f"chips-{directory.name}-{_cache_key(directory, spec, detector_config, limit)}.npz"
    )
    if cache.is_file():
        with np.load(cache) as stored:
            return ChipSet(
                **{k: stored[k] for k in ("chips", "age", "is_male", "source", "names")},
                missed=int(stored["missed"]),
            )
    images = load_labelled(directory, limit)
    log.info("cutting %d face chips from %s (cached in %s)", len(images), directory, cache)
    chip_set = cut_chips(images, spec, detector_config, models_dir, workers)
    log.info(
        "%s: %d chips, %d images without a detected face", directory, len(chip_set), chip_set.missed
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".part.npz")
    np.savez(partial, **asdict(chip_set))
    partial.replace(cache)
    return chip_set
