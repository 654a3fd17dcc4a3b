"""Hugging Face age-group classifiers: ViT FairFace and SigLIP2 facial-age.

Both predict age groups; age is the expected value over the group midpoints and the
group probabilities are kept. The processor's recipe (size, rescale, mean/std) is
read from the checkpoint and applied in numpy to a crop already at the model's
size, which is what the processor would do after its own resize.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import transformers

from stream.types import Estimates

from .base import AGE, CropSpec, EstimatorSettings, InputSpec, ModelLoadError, load_failure

# An open-ended top group ("more than 70", "80+") has no upper end; its midpoint is
# taken this many years above its start.
OPEN_GROUP_SPAN = 10.0

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-|–|to)\s*(\d+)\s*$")
_OPEN = re.compile(
    r"^\s*(?:more than|over|above|>)\s*(\d+)\s*$|^\s*(\d+)\s*(?:\+|and (?:over|above|older))\s*$"
)


def group_midpoint(label: str) -> float:
    """Midpoint in years of an age-group label: "10-19" covers [10, 20) -> 15; "80+" -> 85.

    Raises:
        ValueError: the label names no age range.
    """
    match = _RANGE.match(label)
    if match:
        low, high = int(match[1]), int(match[2])
        return (low + high + 1) / 2
    match = _OPEN.match(label.lower())
    if match:
        return int(match[1] or match[2]) + OPEN_GROUP_SPAN / 2
    raise ValueError(f"cannot read an age range from label {label!r}")


def decode_groups(probabilities: np.ndarray, labels: tuple[str, ...]) -> Estimates:
    """(n, k) group probabilities -> expected age, top-group confidence, groups kept."""
    if probabilities.ndim != 2 or probabilities.shape[1] != len(labels):
        raise ValueError(
            f"group probabilities must have shape (n, {len(labels)}), but got {probabilities.shape}"
        )
    midpoints = np.array([group_midpoint(label) for label in labels], np.float32)
    probabilities = probabilities.astype(np.float32)
    n = len(probabilities)
    return Estimates(
        age=probabilities @ midpoints,
        p_male=np.full((n,), np.nan, np.float32),
        age_confidence=probabilities.max(axis=1) if n else np.zeros((0,), np.float32),
        age_groups=probabilities,
        age_group_labels=labels,
    )


def _processor_size(processor: object) -> int:
    size = getattr(processor, "size", None)
    if isinstance(size, int):
        return size
    # A dict in older releases, a SizeDict with the same keys as attributes in newer ones.
    side = None
    for key in ("height", "shortest_edge"):
        side = side or (size.get(key) if isinstance(size, Mapping) else getattr(size, key, None))
    if not side:
        raise ValueError(f"the image processor names no input size (size={size!r})")
    return int(side)


class HubAgeClassifier:
    """An image classifier over age groups, from a hub id or a `save_pretrained` directory.

    Options:
        margin: box crop side as a multiple of the face box's longer side (the
            FairFace-style padded face).
    """

    name = ""
    default_model = ""
    model_class = "AutoModelForImageClassification"
    predicts: tuple[str, ...] = (AGE,)

    def __init__(self, settings: EstimatorSettings, models_dir: str | Path | None = None) -> None:
        # Hub models use the Hugging Face cache (HF_HOME), where users already keep them.
        options = settings.take({"margin": 1.4})
        source = settings.model or self.default_model
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source)
            model_class = getattr(transformers, self.model_class)
            self._model = model_class.from_pretrained(source).eval()
            size = _processor_size(processor)
        except Exception as error:  # hub, file-format and config errors are all load failures
            raise load_failure(self.name, source, error) from error
        config = self._model.config
        self.labels = tuple(str(config.id2label[i]) for i in range(config.num_labels))
        try:
            for label in self.labels:
                group_midpoint(label)
        except ValueError as error:
            raise ModelLoadError(f"{self.name} model {source}: {error}") from error
        rescale = getattr(processor, "do_rescale", True)
        normalize = getattr(processor, "do_normalize", True)
        self._input = InputSpec(
            CropSpec(size, "box", float(options["margin"])),
            scale=1.0 / processor.rescale_factor if rescale else 1.0,
            mean=tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0),
            std=tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0),
        )
        self.crops = (self._input.crop,)

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        batch = crops[self._input.crop]
        if len(batch) == 0:
            return decode_groups(np.zeros((0, len(self.labels)), np.float32), self.labels)
        with torch.inference_mode():
            logits = self._model(pixel_values=torch.from_numpy(self._input.prepare(batch))).logits
        return decode_groups(logits.softmax(dim=-1).float().numpy(), self.labels)


class VitFairFace(HubAgeClassifier):
    """ViT fine-tuned on FairFace's 9 age groups (0-2 ... more than 70)."""

    name = "vit-fairface"
    default_model = "dima806/fairface_age_image_detection"


class SiglipAge(HubAgeClassifier):
    """SigLIP2 fine-tuned on 8 facial age groups (01-10 ... 80+)."""

    name = "siglip-age"
    default_model = "prithivMLmods/facial-age-detection"
    model_class = "SiglipForImageClassification"
