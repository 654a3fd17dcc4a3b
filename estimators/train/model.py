"""The GenderAge network: a MobileNetV2 or EfficientNet-Lite0 trunk, a gender head and an
age-distribution head; ImageNet weights in, ONNX (seed-004 contract plus the age distribution)
out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# torchvision's MobileNetV2 settings: expansion t, channels c, repeats n, first stride s.
INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# EfficientNet-Lite0 (no squeeze-excitation, ReLU6): expansion, kernel, channels, repeats,
# first stride; the stem (32) and head (1280) widths are fixed in the Lite family.
LITE0_BLOCKS = (
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 2),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
)
# TensorFlow's batch-norm epsilon, which the Lite weights were trained with.
LITE_BN_EPS = 1e-3
FEATURES = 1280
# Input normalization (mean, std) each backbone's ImageNet weights were trained with: the
# Lite checkpoint's stem batch-norm statistics fit TensorFlow's (x - 0.5) / 0.5, not torchvision's.
NORMALIZATION = {
    "mobilenet-v2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "efficientnet-lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
ONNX_OUTPUTS = ("genderage", "age_probs")


def _conv_bn_relu(
    inputs: int, outputs: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block, laid out as torchvision lays it so its weights load by name."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        layers: list[nn.Module] = (
            [] if expansion == 1 else [_conv_bn_relu(inputs, hidden, kernel=1)]
        )
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, outputs, 1, bias=False),
            nn.BatchNorm2d(outputs),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """MobileNetV2's convolutional trunk (width 1.0): (N, 3, H, W) -> (N, 1280, H/32, W/32)."""
    layers: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
    channels = 32
    for expansion, outputs, repeats, stride in INVERTED_RESIDUALS:
        for i in range(repeats):
            layers.append(InvertedResidual(channels, outputs, stride if i == 0 else 1, expansion))
            channels = outputs
    layers.append(_conv_bn_relu(channels, FEATURES, kernel=1))
    return nn.Sequential(*layers)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[nn.ZeroPad2d, int]:
    """TensorFlow's SAME padding for a `size`-pixel input (uneven at stride 2), so that the
    ImageNet weights see the pixel grid they were trained on; and the output size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    return nn.ZeroPad2d((before, total - before, before, total - before)), out


def _lite_conv(
    inputs: int, outputs: int, kernel: int, stride: int, size: int, groups: int = 1
) -> tuple[nn.Sequential, int]:
    """SAME-padded convolution without bias, as stored in the Lite checkpoint; and the output
    size."""
    pad, out = _same_padding(size, kernel, stride)
    return nn.Sequential(
        pad, nn.Conv2d(inputs, outputs, kernel, stride, groups=groups, bias=False)
    ), out


class LiteBlock(nn.Module):
    """EfficientNet-Lite's inverted residual, with the checkpoint's parameter names."""

    def __init__(
        self, inputs: int, outputs: int, expansion: int, kernel: int, stride: int, size: int
    ) -> None:
        super().__init__()
        hidden = inputs * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(inputs, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=LITE_BN_EPS)
        self.expand = expansion != 1
        self._depthwise_conv, self.out_size = _lite_conv(
            hidden, hidden, kernel, stride, size, hidden
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=LITE_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, outputs, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(outputs, eps=LITE_BN_EPS)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0's trunk for `size`-pixel inputs: (N, 3, size, size) -> (N, 1280,
    size/32, size/32); names match the `efficientnet-lite0-57934424.pth` checkpoint."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._conv_stem, size = _lite_conv(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=LITE_BN_EPS)
        blocks, channels = [], 32
        for expansion, kernel, outputs, repeats, stride in LITE0_BLOCKS:
            for i in range(repeats):
                block = LiteBlock(
                    channels, outputs, expansion, kernel, stride if i == 0 else 1, size
                )
                blocks.append(block)
                channels, size = outputs, block.out_size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, FEATURES, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURES, eps=LITE_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def load_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Load the Lite checkpoint (its ImageNet classifier `_fc` is not used); the stored
        convolutions sit behind their padding here, at index 1."""
        renamed = {}
        for key, value in state.items():
            if key.startswith("_fc."):
                continue
            for conv in ("_conv_stem", "_depthwise_conv"):
                key = key.replace(f"{conv}.weight", f"{conv}.1.weight")
            renamed[key] = value
        self.load_state_dict(renamed)


class GenderAgeNet(nn.Module):
    """(N, 3, S, S) RGB in [0, 1] -> gender logits (N, 2: female, male) and age logits
    (N, bins: ages 0, 1, ... years)."""

    # Buffers (register_buffer), declared for the type checker.
    mean: torch.Tensor
    std: torch.Tensor
    ages: torch.Tensor

    def __init__(
        self,
        age_bins: int = 101,
        dropout: float = 0.2,
        backbone: str = "mobilenet-v2",
        size: int = 112,
    ) -> None:
        super().__init__()
        if backbone not in NORMALIZATION:
            raise ValueError(f"backbone {backbone!r}: expected one of {', '.join(NORMALIZATION)}")
        self.features = (
            mobilenet_v2_features()
            if backbone == "mobilenet-v2"
            else EfficientNetLite0Features(size)
        )
        self.dropout = nn.Dropout(dropout)
        self.gender = nn.Linear(FEATURES, 2)
        self.age = nn.Linear(FEATURES, age_bins)
        mean, std = NORMALIZATION[backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("ages", torch.arange(age_bins, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features((x - self.mean) / self.std).mean(dim=(2, 3))
        pooled = self.dropout(pooled)
        return self.gender(pooled), self.age(pooled)

    def load_imagenet(self, path: Path) -> None:
        """Load the backbone's ImageNet weights into the trunk (torchvision's MobileNetV2 or
        the EfficientNet-Lite0 checkpoint; their classifiers are not used)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(self.features, EfficientNetLite0Features):
            self.features.load_checkpoint(state)
            return
        trunk = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(trunk)


class OnnxGenderAge(nn.Module):
    """What is exported: `genderage` (N, 3) = female logit, male logit, expected age / 100
    (seed 004's GenderAge contract) and `age_probs` (N, bins), the age distribution. With
    `flip_average`, each face is also seen mirrored and the two views' outputs averaged."""

    def __init__(self, net: GenderAgeNet, flip_average: bool = False) -> None:
        super().__init__()
        self.net = net
        self.flip_average = flip_average

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.flip_average:
            gender, age_logits = self.net(x)
            probs = torch.softmax(age_logits, dim=1)
        else:
            # One batch of both views: a single pass through the network.
            gender, age_logits = self.net(torch.cat([x, torch.flip(x, dims=[3])]))
            # (2N, K) -> (2, N, K): the batch size stays symbolic in the exported graph.
            gender = gender.reshape(2, -1, gender.shape[1]).mean(dim=0)
            probs = torch.softmax(age_logits, dim=1)
            probs = probs.reshape(2, -1, probs.shape[1]).mean(dim=0)
        age = probs @ self.net.ages
        return torch.cat([gender, (age / 100.0)[:, None]], dim=1), probs


def _export(wrapper: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=list(ONNX_OUTPUTS),
        dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in ONNX_OUTPUTS}},
        opset_version=17,
        dynamo=False,
    )


def export_onnx(
    net: GenderAgeNet, path: Path, size: int, metadata: dict[str, str], flip_average: bool
) -> None:
    """Write the ONNX file with a dynamic batch axis and `metadata` in its properties."""
    import onnx

    wrapper = OnnxGenderAge(net, flip_average).eval()
    dummy = torch.rand(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of one that needs onnxscript; it
        # still exports this plain CNN exactly (check_onnx compares the outputs).
        warnings.simplefilter("ignore", DeprecationWarning)
        # The pads of SAME padding are exported through a reversed (step -1) slice that the
        # exporter does not fold; ONNX Runtime computes it once, the outputs are exact.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        _export(wrapper, dummy, path)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def check_onnx(net: GenderAgeNet, path: Path, batch: np.ndarray, flip_average: bool) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's outputs on `batch`
    ((N, 3, S, S) float32 in [0, 1])."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": batch})
    with torch.no_grad():
        want = OnnxGenderAge(net, flip_average).eval()(torch.from_numpy(batch))
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
