"""A PyTorch ResNet50 age regressor (seed 003): 128x128 RGB, ImageNet mean/std -> years.

There is no torchvision build for every platform, so ResNet50 is written out here
with torchvision's module names: a torchvision state_dict (fc replaced by a
regression head) loads as it is. A TorchScript file loads without this code.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stream.types import Estimates

from .base import (
    AGE,
    CropSpec,
    EstimatorSettings,
    InputSpec,
    ModelLoadError,
    load_failure,
    regression_estimates,
    required_model_file,
)

INPUT_SIZE = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet50 with torchvision's parameter names and a replaceable `fc` head."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        layers = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = head if head is not None else nn.Linear(2048, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def head_from_state_dict(state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the regression head from its weights.

    `fc` is a Linear, or a Sequential whose Linear layers sit at the indices its keys
    name. The weightless positions between them are taken as ReLU: the usual
    Linear-ReLU(-Dropout)-Linear head, where Dropout is the identity at inference.
    """
    if "fc.weight" in state:
        weight = state["fc.weight"]
        return nn.Linear(weight.shape[1], weight.shape[0])
    linears = {
        int(match[1]): state[key].shape
        for key in state
        if (match := re.fullmatch(r"fc\.(\d+)\.weight", key)) and state[key].ndim == 2
    }
    if not linears:
        raise ValueError("no regression head: expected fc.weight or fc.N.weight keys")
    layers: list[nn.Module] = [nn.ReLU() for _ in range(max(linears) + 1)]
    for index, shape in linears.items():
        layers[index] = nn.Linear(shape[1], shape[0])
    return nn.Sequential(*layers)


def _state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: a state_dict, or one wrapped by a training script."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        raise ValueError(f"not a state_dict (got {type(checkpoint).__name__})")
    # nn.DataParallel saves every name under `module.`.
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def load_regressor(path: Path) -> nn.Module:
    """A TorchScript module, or ResNet50 with the checkpoint's head and weights."""
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu")
    state = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = ResNet50(head_from_state_dict(state))
    model.load_state_dict(state)
    return model


class TorchResNet50:
    """Age from a ResNet50 regressor: a state_dict `.pt`/`.pth` or a TorchScript file.

    Options:
        margin: box crop side as a multiple of the face box's longer side.
    """

    name = "torch-resnet50"
    predicts: tuple[str, ...] = (AGE,)

    def __init__(self, settings: EstimatorSettings, models_dir: str | Path | None = None) -> None:
        options = settings.take({"margin": 1.4})
        path = required_model_file(
            self.name, settings.model, "state_dict or TorchScript", "PyTorch"
        )
        try:
            self._model = load_regressor(path).eval()
            with torch.inference_mode():
                shape = tuple(self._model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).shape)
        except Exception as error:  # pickle, zip, key and shape errors are all load failures
            raise load_failure(self.name, path, error) from error
        if shape != (1, 1):
            raise ModelLoadError(
                f"{path}: an age regressor must output (n, 1), but this one outputs {shape}"
            )
        self._input = InputSpec(
            CropSpec(INPUT_SIZE, "box", float(options["margin"])),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        self.crops = (self._input.crop,)

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        batch = crops[self._input.crop]
        if len(batch) == 0:
            return regression_estimates(np.zeros((0,), np.float32))
        with torch.inference_mode():
            output = self._model(torch.from_numpy(self._input.prepare(batch)))
        return regression_estimates(output[:, 0].float().numpy())
