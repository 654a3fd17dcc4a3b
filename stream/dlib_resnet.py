"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`): a reader for
dlib's binary serialization of it and its conversion to an ONNX graph (`dlib_resnet_to_onnx`).

The model: "This model is a ResNet network with 29 conv layers. It's essentially a version of
the ResNet-34 network [...] with a few layers removed and the number of filters per layer
reduced by half." Licence, in the words of davisking/dlib-models' README: "As far as I am
concerned, anyone can do whatever they want with these model files as I've released them into
the public domain." It was "trained from scratch on a dataset of about 3 million faces [...] The
face scrub dataset, the VGG dataset, and then a large number of images I scraped from the
internet"; the README gives no licence terms for that training data.

The network is the `anet_type` of dlib's tools/python/src/face_recognition.cpp; a .dat holds
its parameters, not its shape (tag and skip ids are C++ template arguments), so `_ANET` spells
that type out and the reader checks each layer's name in the file against it. The layout read
here is dlib's (dlib/serialize.h, dlib/float_details.h, dlib/dnn/{core,tensor,input,layers,
loss}.h): integers as a control byte (bit 7 the sign, the low 4 bits a byte count) and that
many little-endian magnitude bytes; floats as two such integers, mantissa then exponent;
strings as a length and raw bytes; bools as ASCII '0'/'1'. Parameter tensors (version 2) are
raw little-endian IEEE float32, so the 5.6 M weights load as numpy views, no per-float
decoding (older dlib's version 1 tensors, a mantissa/exponent pair per float, are refused).

ONNX model: input `chips`, (N, 150, 150, 3) uint8 RGB face chips cut as dlib's
`get_face_chip(img, shape, size=150, padding=0.25)`; output `descriptors`, (N, 128) float32,
dlib's own (not normalised) descriptors. The graph subtracts the per-channel means stored in
the file (122.782, 117.001, 104.298) and divides by 256, as `input_rgb_image_sized` does. Each
affine layer (dlib's frozen batch norm) is folded into the convolution it follows; a residual
sum whose operands differ in size is zero-padded to the larger, as dlib's add_prev does (checked
against dlib 20.0.1: the outputs agree within 1e-6). The bytes are deterministic: a fixed
producer, IR version and opset, and no timestamps.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CHIP_SIZE = 150
DESCRIPTOR_SIZE = 128
INPUT_NAME = "chips"
OUTPUT_NAME = "descriptors"
PRODUCER = ("agestream.dlib_resnet", "1")
OPSET = 17
IR_VERSION = 8  # ONNX Runtime 1.14 and later load it

# float_details' exponent values that stand for inf, -inf and NaN.
_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class DlibFormatError(ValueError):
    """The bytes are not the dlib network this module reads; the message says where."""


# --- the network's type, outermost layer first, as dlib declares it -------------------------
# A layer is (kind, tag id); the id is only meaningful for "tag", "skip" and "add_prev".
Layer = tuple[str, int]


def _block() -> list[Layer]:
    # block<N,BN,stride,SUBNET> = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUBNET>>>>>
    return [("affine", 0), ("con", 0), ("relu", 0), ("affine", 0), ("con", 0)]


def _ares() -> list[Layer]:
    # relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
    return [("relu", 0), ("add_prev", 1), *_block(), ("tag", 1)]


def _ares_down() -> list[Layer]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>
    return [
        ("relu", 0), ("add_prev", 2), ("avg_pool", 0), ("skip", 1), ("tag", 2), *_block(),
        ("tag", 1),
    ]  # fmt: skip


# loss_metric<fc_no_bias<128,avg_pool_everything<alevel0<...alevel4<max_pool<3,3,2,2,relu<
# affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>...>>>>; alevel0 = ares_down<256>,
# alevel1 = ares<256,ares<256,ares_down<256>>>, alevel2 the same with 128, alevel3 =
# ares<64> x3 on ares_down<64>, alevel4 = ares<32> x3.
_ANET: tuple[Layer, ...] = (
    ("fc", 0), ("avg_pool", 0),
    *_ares_down(),
    *_ares(), *_ares(), *_ares_down(),
    *_ares(), *_ares(), *_ares_down(),
    *_ares(), *_ares(), *_ares(), *_ares_down(),
    *_ares(), *_ares(), *_ares(),
    ("max_pool", 0), ("relu", 0), ("affine", 0), ("con", 0),
)  # fmt: skip
_WRAPPERS = ("tag", "skip")  # add_tag_layer / add_skip_layer: no details, no state


# --- what the file holds -------------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    """A convolution: weight (out, in, rows, cols), bias (out,)."""

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Affine:
    """Per-channel `x * gamma + beta` (dlib's batch norm, frozen)."""

    gamma: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class Pool:
    """Max or average pooling; window (0, 0) pools the whole feature map."""

    kind: str  # "max_pool" or "avg_pool"
    window: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Fc:
    """A fully connected layer: `x @ weight + bias`, weight (in, out)."""

    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True)
class Op:
    """A layer without parameters: "relu", or "tag"/"skip"/"add_prev" with the tag id."""

    kind: str
    tag: int = 0


Node = Conv | Affine | Pool | Fc | Op


@dataclass(frozen=True)
class DlibResNet:
    """The parsed network: input means (R, G, B), chip size, layers from the input outward."""

    means: tuple[float, float, float]
    size: int
    layers: tuple[Node, ...]


class _Reader:
    """A cursor over dlib-serialized bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.pos = 0

    def _take(self, count: int) -> memoryview:
        if count < 0 or self.pos + count > len(self._data):
            raise DlibFormatError(f"unexpected end of data at byte {self.pos}")
        chunk = self._data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#04x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        byte = bytes(self._take(1))
        if byte not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {byte!r} at byte {self.pos - 1}")
        return byte == b"1"

    def string(self) -> str:
        return bytes(self._take(self.int())).decode("latin-1")

    def name(self, *expected: str) -> str:
        """A layer's version string, which must be one of `expected`."""
        at, name = self.pos, self.string()
        if name not in expected:
            raise DlibFormatError(f"expected {' or '.join(expected)} at byte {at}, got {name!r}")
        return name

    def tensor(self) -> np.ndarray:
        """A resizable_tensor: (samples, k, rows, cols) float32."""
        version = self.int()
        if version != 2:
            # Version 1, from older dlib, wrote each float as a mantissa/exponent pair.
            raise DlibFormatError(f"tensor version {version} at byte {self.pos}; only 2 is read")
        shape = tuple(self.int() for _ in range(4))
        count = math.prod(shape)
        data = self._take(4 * count)
        return np.frombuffer(data, dtype="<f4", count=count).astype(np.float32).reshape(shape)

    def alias(self) -> tuple[builtins.int, ...]:  # `int` in this class is the method
        """An alias_tensor (a view into a layer's parameters): only its shape is stored."""
        if self.int() != 1:
            raise DlibFormatError(f"unexpected alias_tensor version at byte {self.pos}")
        return tuple(self.int() for _ in range(4))


def _slice(params: np.ndarray, start: int, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    if start + count > params.size:
        raise DlibFormatError(f"parameter tensor of {params.size} floats too short for {shape}")
    return params[start : start + count].reshape(shape)


def _read_con(reader: _Reader) -> Conv:
    version = reader.name("con_4", "con_5", "con_6")
    params = reader.tensor().ravel()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(7))
    weight_shape = reader.alias()
    reader.alias()  # biases: (1, filters, 1, 1) when there are any; `filters` says as much
    for _ in range(4):
        reader.float()  # learning-rate and weight-decay multipliers: training only
    use_bias = reader.bool() if version != "con_4" else True
    if version == "con_6" and reader.bool():
        raise DlibFormatError(f"con_ with a fused relu at byte {reader.pos} is not supported")
    weight = _slice(params, 0, weight_shape)
    if weight.shape[0] != filters or weight.shape[2:] != (rows, cols):
        raise DlibFormatError(f"con_ filters {weight.shape} do not match {filters}x{rows}x{cols}")
    bias = _slice(params, weight.size, (filters,)) if use_bias else np.zeros(filters, np.float32)
    return Conv(weight, bias, (stride_y, stride_x), (pad_y, pad_x))


def _read_affine(reader: _Reader) -> Affine:
    version = reader.name("affine_", "affine_2")
    params = reader.tensor().ravel()
    gamma_shape, beta_shape = reader.alias(), reader.alias()
    reader.int()  # layer_mode; the gamma shape below says it is per channel
    if version == "affine_2" and reader.bool():
        raise DlibFormatError(f"a disabled affine_ at byte {reader.pos} is not supported")
    if gamma_shape[2:] != (1, 1):
        raise DlibFormatError(f"affine_ with per-pixel gamma {gamma_shape} is not supported")
    gamma = _slice(params, 0, gamma_shape).ravel()
    return Affine(gamma, _slice(params, gamma.size, beta_shape).ravel())


def _read_pool(reader: _Reader, kind: str) -> Pool:
    reader.name(f"{kind}_2")
    rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(6))
    if kind == "avg_pool" and (pad_y or pad_x):
        raise DlibFormatError("avg_pool_ with padding is not supported")
    return Pool(kind, (rows, cols), (stride_y, stride_x), (pad_y, pad_x))


def _read_fc(reader: _Reader) -> Fc:
    reader.name("fc_2")
    outputs, inputs = reader.int(), reader.int()
    params = reader.tensor().ravel()
    reader.alias(), reader.alias()  # weights (inputs, outputs), biases (1, outputs)
    reader.int()  # bias mode; the parameter count says whether there is a bias
    for _ in range(4):
        reader.float()  # learning-rate and weight-decay multipliers: training only
    weight = _slice(params, 0, (inputs, outputs))
    bias = _slice(params, weight.size, (outputs,)) if params.size > weight.size else None
    return Fc(weight, bias)


def _read_details(reader: _Reader, kind: str) -> Node:
    if kind == "con":
        return _read_con(reader)
    if kind == "affine":
        return _read_affine(reader)
    if kind in ("max_pool", "avg_pool"):
        return _read_pool(reader, kind)
    if kind == "fc":
        return _read_fc(reader)
    reader.name(f"{kind}_")  # relu_, add_prev_: no parameters
    return Op(kind)


def _skip_state(reader: _Reader, version: int, on_input: bool) -> None:
    """An add_layer's training state after its details: three bools and scratch tensors."""
    for _ in range(3):
        reader.bool()  # setup called, gradient stale, output getters disabled
    reader.tensor(), reader.tensor()  # x_grad, cached_output
    if on_input:
        reader.tensor()  # grad_final
        if version >= 3:
            reader.int()  # sample expansion factor
    elif version >= 2:
        reader.tensor()  # params_grad


def _read_versions(reader: _Reader) -> list[int]:
    """Each layer's wrapper version, outermost first: dlib writes them all before any details."""
    versions = []
    for index, (kind, _) in enumerate(_ANET):
        at, version = reader.pos, reader.int()
        if kind in _WRAPPERS:
            allowed: tuple[int, ...] = (1,)
        elif index == len(_ANET) - 1:
            allowed = (2, 3)  # the add_layer sitting on the input layer
        else:
            allowed = (1, 2)
        if version not in allowed:
            raise DlibFormatError(f"layer {index} ({kind}): version {version} at byte {at}")
        versions.append(version)
    return versions


def read_dlib_resnet(dat: bytes) -> DlibResNet:
    """Parse dlib_face_recognition_resnet_model_v1.dat; DlibFormatError if it is anything else."""
    reader = _Reader(dat)
    if reader.int() != 1:
        raise DlibFormatError("not a dlib add_loss_layer (version 1) at byte 0")
    reader.name("loss_metric_2")
    reader.float(), reader.float()  # margin, distance threshold: training only
    versions = _read_versions(reader)
    reader.name("input_rgb_image_sized")
    means = (reader.float(), reader.float(), reader.float())
    rows, cols = reader.int(), reader.int()
    if rows != cols:
        raise DlibFormatError(f"input chips of {rows}x{cols}; expected square chips")
    layers: list[Node] = []
    for index in reversed(range(len(_ANET))):
        kind, tag = _ANET[index]
        if kind in _WRAPPERS:
            layers.append(Op(kind, tag))
            continue
        node = _read_details(reader, kind)
        layers.append(Op(kind, tag) if kind == "add_prev" else node)
        _skip_state(reader, versions[index], on_input=index == len(_ANET) - 1)
    if reader.pos != len(dat):
        raise DlibFormatError(f"{len(dat) - reader.pos} bytes left after the network")
    return DlibResNet(means, rows, tuple(layers))


# --- the ONNX graph ------------------------------------------------------------------------
class _Graph:
    """ONNX nodes and initializers with deterministic names, and each value's (C, H, W)."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self._name(stem)
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs: Any) -> str:
        output = self._name(op.lower())
        self.nodes.append(self._helper.make_node(op, inputs, [output], name=output, **attrs))
        self.shapes[output] = shape
        return output


def _out_size(size: int, window: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - window) // stride


def _folded(conv: Conv, affine: Affine | None) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the affine after it folded in (in float64, then rounded)."""
    weight, bias = conv.weight.astype(np.float64), conv.bias.astype(np.float64)
    if affine is not None:
        gamma = affine.gamma.astype(np.float64)
        weight = weight * gamma[:, None, None, None]
        bias = bias * gamma + affine.beta.astype(np.float64)
    return weight.astype(np.float32), bias.astype(np.float32)


def _emit_conv(graph: _Graph, x: str, conv: Conv, affine: Affine | None) -> str:
    weight, bias = _folded(conv, affine)
    _, rows, cols = graph.shapes[x]
    (stride_y, stride_x), (pad_y, pad_x) = conv.stride, conv.padding
    shape = (
        weight.shape[0],
        _out_size(rows, weight.shape[2], stride_y, pad_y),
        _out_size(cols, weight.shape[3], stride_x, pad_x),
    )
    inputs = [x, graph.const("weight", weight), graph.const("bias", bias)]
    return graph.node(
        "Conv", inputs, shape,
        kernel_shape=list(weight.shape[2:]), strides=[stride_y, stride_x],
        pads=[pad_y, pad_x, pad_y, pad_x],
    )  # fmt: skip


def _emit_pool(graph: _Graph, x: str, pool: Pool) -> str:
    channels, rows, cols = graph.shapes[x]
    if pool.window == (0, 0):
        op = "GlobalMaxPool" if pool.kind == "max_pool" else "GlobalAveragePool"
        return graph.node(op, [x], (channels, 1, 1))
    (window_y, window_x), (stride_y, stride_x), (pad_y, pad_x) = (
        pool.window, pool.stride, pool.padding
    )  # fmt: skip
    shape = (
        channels,
        _out_size(rows, window_y, stride_y, pad_y),
        _out_size(cols, window_x, stride_x, pad_x),
    )
    return graph.node(
        "MaxPool" if pool.kind == "max_pool" else "AveragePool", [x], shape,
        kernel_shape=[window_y, window_x], strides=[stride_y, stride_x],
        pads=[pad_y, pad_x, pad_y, pad_x],
    )  # fmt: skip


def _emit_add(graph: _Graph, a: str, b: str) -> str:
    """dlib's add_prev: the sum has each dimension of the larger operand; the smaller one is
    zero-padded after its last channel, row and column (tt::add's out-of-range zeros)."""
    shape = tuple(max(pair) for pair in zip(graph.shapes[a], graph.shapes[b]))
    padded = []
    for x in (a, b):
        grow = [target - have for target, have in zip(shape, graph.shapes[x])]
        if any(grow):
            pads = graph.const("pads", np.array([0, 0, 0, 0, 0, *grow], np.int64))
            x = graph.node("Pad", [x, pads], shape)
        padded.append(x)
    return graph.node("Add", padded, shape)


def _emit_input(graph: _Graph, net: DlibResNet) -> str:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 `(pixel - mean) / 256`."""
    shape = (3, net.size, net.size)
    x = graph.node("Cast", [INPUT_NAME], shape, to=1)  # 1: FLOAT
    x = graph.node("Sub", [x, graph.const("means", np.array(net.means, np.float32))], shape)
    x = graph.node("Mul", [x, graph.const("scale", np.array(1 / 256, np.float32))], shape)
    return graph.node("Transpose", [x], shape, perm=[0, 3, 1, 2])


def _emit_layers(graph: _Graph, x: str, layers: tuple[Node, ...]) -> str:
    tags: dict[int, str] = {}
    index = 0
    while index < len(layers):
        layer = layers[index]
        following = layers[index + 1] if index + 1 < len(layers) else None
        if isinstance(layer, Conv):
            # Every affine of this network sits on a convolution (BN<con<...>>).
            affine = following if isinstance(following, Affine) else None
            x = _emit_conv(graph, x, layer, affine)
            index += affine is not None
        elif isinstance(layer, Affine):
            raise DlibFormatError("an affine_ layer that does not follow a con_")
        elif isinstance(layer, Pool):
            x = _emit_pool(graph, x, layer)
        elif isinstance(layer, Fc):
            x = _emit_fc(graph, x, layer)
        elif layer.kind == "relu":
            x = graph.node("Relu", [x], graph.shapes[x])
        elif layer.kind == "tag":
            tags[layer.tag] = x
        elif layer.kind == "skip":
            x = tags[layer.tag]
        elif layer.kind == "add_prev":
            x = _emit_add(graph, x, tags[layer.tag])
        index += 1
    return x


def _emit_fc(graph: _Graph, x: str, fc: Fc) -> str:
    inputs, outputs = fc.weight.shape
    if math.prod(graph.shapes[x]) != inputs:
        raise DlibFormatError(f"fc_ takes {inputs} inputs, got {graph.shapes[x]}")
    x = graph.node("Flatten", [x], (inputs, 1, 1), axis=1)
    x = graph.node("MatMul", [x, graph.const("fc_weight", fc.weight)], (outputs, 1, 1))
    if fc.bias is not None:
        x = graph.node("Add", [x, graph.const("fc_bias", fc.bias)], (outputs, 1, 1))
    return x


def to_onnx(net: DlibResNet) -> bytes:
    """The serialized ONNX model of a parsed network (see the module docstring)."""
    from onnx import TensorProto, helper

    graph = _Graph()
    x = _emit_layers(graph, _emit_input(graph, net), net.layers)
    outputs = graph.shapes[x][0]
    graph.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name=OUTPUT_NAME))
    size = net.size
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "dlib_face_recognition_resnet_model_v1",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", size, size, 3])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", outputs])],
            graph.initializers,
        ),
        producer_name=PRODUCER[0],
        producer_version=PRODUCER[1],
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        doc_string="dlib_face_recognition_resnet_model_v1 (public domain, Davis King), "
        "converted by agestream: (N,150,150,3) uint8 RGB chips -> (N,128) descriptors",
    )
    return model.SerializeToString()


def dlib_resnet_to_onnx(dat: bytes) -> bytes:
    """Convert dlib_face_recognition_resnet_model_v1.dat to ONNX bytes (same bytes every time).

    Raises DlibFormatError when `dat` is not that network.
    """
    net = read_dlib_resnet(dat)
    if net.size != CHIP_SIZE:
        raise DlibFormatError(f"input chips of {net.size} px; expected {CHIP_SIZE}")
    return to_onnx(net)
