"""A PyTorch IResNet (the ArcFace backbone of insightface's ``w600k_r50``) that loads its weights from ONNX.

insightface ships ArcFace as ONNX, which gives no gradients. An identity loss needs the same network in
PyTorch: this module rebuilds the architecture and copies the weights out of the user's ONNX file.

Architecture (input 112x112 RGB, normalised as ``(pixel - 127.5) / 127.5``)::

    stem     conv3x3(3->64) -> BN -> PReLU                                   (B, 64, 112, 112)
    stage i  blocks x IBasicBlock, width 64/128/256/512, stride 2 at the first block
             block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN  (+ shortcut)
             shortcut of the first block: conv1x1(stride) -> BN             (B, 512, 7, 7) after stage 4
    head     BN2d(512) -> dropout -> flatten -> Linear(512*7*7, 512) -> BatchNorm1d(512)  -> (B, 512)

``iresnet50`` uses [3, 4, 14, 3] blocks (``w600k_r50``); ``iresnet100`` uses [3, 13, 30, 3] (``glintr100``).

Loading (``load_onnx_weights``) first tries the initializer names (a file exported from this module with
names kept), then matches the graph's weighted operators in order and by shape against the module. Exporters
fold a BatchNorm that follows a Conv or Gemm into its weights (the real ``w600k_r50.onnx`` has a biased Conv
for every conv+BN pair); the folded BN is then set to an identity carrying the bias.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ONNX_HINT = ("put insightface's recognition model (e.g. w600k_r50.onnx from the buffalo_l pack) into "
             "ComfyUI's models/insightface folder")


@dataclass
class IResNetConfig:
    """Shape of an IResNet. Defaults are ``w600k_r50``."""

    layers: tuple[int, ...] = (3, 4, 14, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    embedding_size: int = 512
    input_size: int = 112
    dropout: float = 0.0
    bn_eps: float = 1e-5


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free 3x3 convolution with padding 1."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """The pre-activation residual block: BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, eps: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut

    def graph_order(self) -> list[nn.Module]:
        """Weighted modules in the order an exported graph computes them (main branch, then shortcut)."""
        mods = [self.bn1, self.conv1, self.bn2, self.prelu, self.conv2, self.bn3]
        return mods + (list(self.downsample) if self.downsample is not None else [])


class IResNet(nn.Module):
    """insightface's IResNet: (B, 3, 112, 112) normalised input -> (B, embedding_size) raw embedding."""

    def __init__(self, config: IResNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or IResNetConfig()
        if len(cfg.layers) != 4 or len(cfg.widths) != 4:
            raise ValueError(f"an IResNet has 4 stages: got layers {cfg.layers}, widths {cfg.widths}")
        self.conv1 = conv3x3(3, cfg.widths[0])
        self.bn1 = nn.BatchNorm2d(cfg.widths[0], eps=cfg.bn_eps)
        self.prelu = nn.PReLU(cfg.widths[0])
        cin, stages = cfg.widths[0], []
        for blocks, width in zip(cfg.layers, cfg.widths):
            stage = [IBasicBlock(cin, width, 2, cfg.bn_eps)]
            stage += [IBasicBlock(width, width, 1, cfg.bn_eps) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages  # insightface's names
        spatial = cfg.input_size // 2 ** len(cfg.layers)
        self.bn2 = nn.BatchNorm2d(cin, eps=cfg.bn_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cin * spatial * spatial, cfg.embedding_size)
        self.features = nn.BatchNorm1d(cfg.embedding_size, eps=cfg.bn_eps)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)  # insightface keeps this scale fixed at 1
        self.weights_source = "random initialisation"  # set by load_onnx_weights

    def stage_list(self) -> list[nn.Sequential]:
        """The residual stages in order."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in self.stage_list():
            x = stage(x)
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))

    def graph_order(self) -> list[nn.Module]:
        """Every weighted module in the order of the forward pass (the order of an exported graph)."""
        mods: list[nn.Module] = [self.conv1, self.bn1, self.prelu]
        for stage in self.stage_list():
            for block in stage:
                mods += block.graph_order()
        return mods + [self.bn2, self.fc, self.features]


def iresnet(layers: Sequence[int], **kw) -> IResNet:
    """An IResNet with the given blocks per stage; ``kw`` sets other ``IResNetConfig`` fields."""
    return IResNet(IResNetConfig(layers=tuple(layers), **kw))


def iresnet50(**kw) -> IResNet:
    """IResNet-50, the backbone of ``w600k_r50`` (buffalo_l)."""
    return iresnet((3, 4, 14, 3), **kw)


def iresnet100(**kw) -> IResNet:
    """IResNet-100, the backbone of ``glintr100`` (antelopev2)."""
    return iresnet((3, 13, 30, 3), **kw)


class ArcFaceTorch(nn.Module):
    """A frozen, differentiable ArcFace: RGB faces in [0, 1] -> L2-normalised embeddings.

    Gradients flow to the input images; the backbone's weights stay frozen and in eval mode.
    Faces must be aligned 112x112 crops (see ``models.face_crop.crop_faces``), RGB channel order as
    insightface feeds its ONNX model.
    """

    def __init__(self, model: IResNet):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.input_size = model.config.input_size

    def train(self, mode: bool = True) -> "ArcFaceTorch":
        """Keep the backbone in eval mode (BatchNorm running statistics) whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.embed(images01)

    def embed(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [0, 1] -> (B, 512) unit vectors, differentiable w.r.t. the images."""
        size = self.input_size
        if images01.ndim != 4 or tuple(images01.shape[1:]) != (3, size, size):
            raise ValueError(f"ArcFace needs aligned faces of shape (B, 3, {size}, {size}), got "
                             f"{tuple(images01.shape)}: crop them with models.face_crop.crop_faces")
        weight = self.model.conv1.weight
        x = (images01.to(weight.dtype) - 0.5) / 0.5  # == (pixel - 127.5) / 127.5
        return F.normalize(self.model(x), dim=-1)


# ----------------------------------------------------------------------------------------------- ONNX

class OnnxWeightError(ValueError):
    """An ONNX file's weights do not fit the PyTorch module; the message names the file and the mismatch."""


@dataclass
class OnnxOp:
    """One weighted operator of an ONNX graph, with its arrays in torch layout."""

    kind: str  # "conv", "bn", "prelu", "linear"
    name: str
    arrays: dict[str, np.ndarray]
    eps: float = 1e-5


_PASS_THROUGH = {"Identity", "Unsqueeze", "Reshape", "Cast", "Squeeze", "Flatten"}


class _Graph:
    """Resolves node inputs to constant arrays (initializers, Constant nodes, reshapes of those)."""

    def __init__(self, model, path: Path):
        from onnx import numpy_helper
        self.helper, self.model, self.path, self._ops = numpy_helper, model, path, None
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute:
                self.consts[node.output[0]] = self._attr_value(node.attribute[0])

    def _attr_value(self, attr):
        from onnx import helper
        value = helper.get_attribute_value(attr)
        return self.helper.to_array(value) if hasattr(value, "dims") else np.asarray(value)

    def const(self, name: str) -> np.ndarray | None:
        """The constant array behind ``name``, following Identity/Unsqueeze/Reshape/Cast; None if computed."""
        for _ in range(8):
            if name in self.consts:
                return np.asarray(self.consts[name], dtype=np.float32)
            node = self.producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            name = node.input[0]
        return None

    def ops(self) -> list[OnnxOp]:
        """The weighted operators in graph order (computed once)."""
        if self._ops is None:
            self._ops = onnx_ops(self)
        return self._ops


def _attr(node, name: str, default):
    """An attribute of an ONNX node, or ``default``."""
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node_op(graph: _Graph, node) -> OnnxOp | None:
    """The weighted operator a node stands for, or None for weight-free nodes."""
    c = [graph.const(i) if i else None for i in node.input]
    if node.op_type == "Conv" and c[1] is not None:
        return OnnxOp("conv", node.name, {"weight": c[1], **({"bias": c[2]} if len(c) > 2 and c[2] is not None
                                                             else {})})
    if node.op_type == "BatchNormalization" and all(x is not None for x in c[1:5]):
        arrays = dict(zip(("weight", "bias", "running_mean", "running_var"), c[1:5]))
        return OnnxOp("bn", node.name, arrays, float(_attr(node, "epsilon", 1e-5)))
    if node.op_type == "PRelu" and c[1] is not None:
        return OnnxOp("prelu", node.name, {"weight": c[1].reshape(-1)})
    if node.op_type == "Gemm" and c[1] is not None:
        w = c[1] if _attr(node, "transB", 0) else c[1].T
        w = w * float(_attr(node, "alpha", 1.0))
        bias = c[2] * float(_attr(node, "beta", 1.0)) if len(c) > 2 and c[2] is not None else None
        return OnnxOp("linear", node.name, {"weight": w, **({"bias": bias} if bias is not None else {})})
    if node.op_type == "MatMul" and c[1] is not None and c[1].ndim == 2:
        return OnnxOp("linear", node.name, {"weight": c[1].T})
    return None


def onnx_ops(graph: _Graph) -> list[OnnxOp]:
    """The weighted operators of an ONNX graph in order; a MatMul + constant Add pair becomes one linear."""
    ops: list[OnnxOp] = []
    for node in graph.model.graph.node:
        if node.op_type == "Add" and ops and ops[-1].kind == "linear" and "bias" not in ops[-1].arrays:
            bias = next((graph.const(i) for i in node.input if graph.const(i) is not None), None)
            if bias is not None and bias.ndim == 1:
                ops[-1].arrays["bias"] = bias
                continue
        op = _node_op(graph, node)
        if op is not None:
            ops.append(op)
    return ops


def _check_normalisation(model, path: Path) -> None:
    """Reject mxnet-era models that normalise inside the graph (Sub and Mul first): the port expects 127.5."""
    first = [n.op_type for n in model.graph.node[:8]]
    if "Sub" in first and "Mul" in first:
        raise OnnxWeightError(f"{path}: this ONNX model normalises its input inside the graph (mxnet export); "
                              f"only PyTorch-exported IResNet models such as w600k_r50.onnx are supported")


def _load_by_name(module: nn.Module, graph: "_Graph") -> bool:
    """Copy initializers whose names equal the module's state_dict keys; True when every key was found."""
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    arrays = {k: graph.consts.get(k) for k in state}
    if not all(a is not None and a.size == state[k].numel() for k, a in arrays.items()):
        return False
    for k, v in state.items():
        _set(v, np.asarray(arrays[k], dtype=np.float32), k)
    return True


def _set(param: torch.Tensor, array: np.ndarray, where: str) -> None:
    """Copy an array into a parameter or buffer of the same number of elements."""
    if array.size != param.numel():
        raise OnnxWeightError(f"{where}: shape {tuple(array.shape)} does not fit {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.tensor(array, dtype=param.dtype).reshape(param.shape))


def _set_bn(bn: nn.modules.batchnorm._BatchNorm, op: OnnxOp, where: str) -> None:
    """Load a BatchNormalization operator into a torch BatchNorm."""
    for key, array in op.arrays.items():
        _set(getattr(bn, key), array, where)
    bn.eps = op.eps


def _set_identity_bn(bn: nn.modules.batchnorm._BatchNorm, bias: np.ndarray | None, where: str) -> None:
    """Make a BatchNorm that the exporter folded away an exact identity plus the folded bias."""
    n = bn.num_features
    _set(bn.weight, np.ones(n, np.float32), where)
    _set(bn.bias, bias if bias is not None else np.zeros(n, np.float32), where)
    _set(bn.running_mean, np.zeros(n, np.float32), where)
    _set(bn.running_var, np.full(n, 1.0 - bn.eps, np.float32), where)  # sqrt(var + eps) == 1


def _shape_of(module: nn.Module) -> str:
    """A short description of a torch module's weight shape, for error messages."""
    w = getattr(module, "weight", None)
    return f"{type(module).__name__}{tuple(w.shape) if w is not None else ''}"


def _fits(module: nn.Module, op: OnnxOp | None) -> bool:
    """Whether an ONNX operator has the kind and weight size of a torch module."""
    kinds = {nn.Conv2d: "conv", nn.PReLU: "prelu", nn.Linear: "linear"}
    kind = "bn" if isinstance(module, nn.modules.batchnorm._BatchNorm) else kinds.get(type(module))
    return op is not None and op.kind == kind and op.arrays["weight"].size == module.weight.numel()


class _Matcher:
    """Walks the module's weighted layers and the graph's weighted operators side by side."""

    def __init__(self, names: dict[nn.Module, str], ops: list[OnnxOp], path: Path):
        self.names, self.ops, self.path, self.i = names, ops, path, 0

    def peek(self) -> OnnxOp | None:
        return self.ops[self.i] if self.i < len(self.ops) else None

    def fail(self, module: nn.Module) -> OnnxWeightError:
        op = self.peek()
        got = (f"operator #{self.i} '{op.name}' ({op.kind}, weight {tuple(op.arrays['weight'].shape)})"
               if op else "the end of the graph")
        return OnnxWeightError(f"{self.path}: first mismatch at module '{self.names[module]}' "
                               f"({_shape_of(module)}): the ONNX graph has {got}. Is this an IResNet "
                               f"({len(self.ops)} weighted operators) of the same depth?")

    def _load_weighted(self, module: nn.Module, where: str) -> tuple[bool, np.ndarray | None]:
        """Load a conv/PReLU/linear; return (may carry a folded BN, the bias meant for that BN)."""
        op = self.take(module)
        _set(module.weight, op.arrays["weight"], where)
        bias = op.arrays.get("bias")
        if isinstance(module, nn.PReLU):
            return False, None
        if getattr(module, "bias", None) is None:  # a bias-free conv with an ONNX bias: its BN was folded in
            return bias is not None, bias
        _set(module.bias, bias if bias is not None else np.zeros(module.bias.numel(), np.float32), where)
        return True, None  # a linear: its BN is folded in only if the graph has no BN next

    def take(self, module: nn.Module) -> OnnxOp:
        if not _fits(module, self.peek()):
            raise self.fail(module)
        self.i += 1
        return self.ops[self.i - 1]

    def load(self, mods: list[nn.Module]) -> None:
        """Load every module; a BatchNorm right after a conv/linear may have been folded into it."""
        folded_bias: np.ndarray | None = None
        folded = False  # the previous conv/linear carries the following BatchNorm
        for module in mods:
            where = f"{self.path}: '{self.names[module]}'"
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if folded and (folded_bias is not None or not _fits(module, self.peek())):
                    _set_identity_bn(module, folded_bias, where)
                else:
                    _set_bn(module, self.take(module), where)
                folded, folded_bias = False, None
                continue
            folded, folded_bias = self._load_weighted(module, where)
        if self.i != len(self.ops):
            raise OnnxWeightError(f"{self.path}: {len(self.ops) - self.i} weighted ONNX operators are left over "
                                  f"after loading every module (first '{self.ops[self.i].name}'): the file's "
                                  f"network is deeper than this IResNet")


def _read_onnx(path: str | Path) -> _Graph:
    """Load an ONNX file, with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ArcFace ONNX file not found: {path}. {ONNX_HINT}")
    import onnx
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf/IO errors have many types; re-raise with the file name
        raise OnnxWeightError(f"{path}: not a readable ONNX model ({exc})") from exc
    _check_normalisation(model, path)
    return _Graph(model, path)


def load_onnx_weights(model: IResNet, path: str | Path, graph: _Graph | None = None) -> IResNet:
    """Copy the weights of an ONNX IResNet file into ``model`` (in place) and return it in eval mode.

    Initializers named like the module's state_dict keys are copied by name; otherwise the graph's weighted
    operators are matched in order and by shape, and the first mismatch raises ``OnnxWeightError``.
    """
    graph = graph if graph is not None else _read_onnx(path)
    if _load_by_name(model, graph):
        how = "by initializer name"
    else:
        names = {m: n for n, m in model.named_modules()}
        _Matcher(names, graph.ops(), graph.path).load(model.graph_order())
        how = "by graph order and shape"
    model.weights_source = f"{graph.path} ({how})"
    log.info("loaded %s into %s %s", graph.path, type(model).__name__, how)
    return model.eval()


def infer_config(graph: _Graph) -> IResNetConfig:
    """Blocks per stage and embedding size of an ONNX IResNet, read from its 3x3 convolutions and last linear."""
    convs = [op.arrays["weight"].shape for op in graph.ops() if op.kind == "conv"]
    linears = [op.arrays["weight"].shape for op in graph.ops() if op.kind == "linear"]
    widths = IResNetConfig().widths
    counts = [sum(1 for s in convs if s[0] == w and s[1] != 3 and s[2:] == (3, 3)) for w in widths]
    if not linears or any(c == 0 or c % 2 for c in counts):
        raise OnnxWeightError(f"{graph.path}: not an IResNet (3x3 convolutions per width "
                              f"{dict(zip(widths, counts))}, {len(linears)} linear layers)")
    return IResNetConfig(layers=tuple(c // 2 for c in counts), embedding_size=int(linears[-1][0]))


def load_arcface_onnx(path: str | Path, device: torch.device | str = "cpu") -> ArcFaceTorch:
    """A differentiable ArcFace built from an insightface recognition ONNX file (e.g. ``w600k_r50.onnx``).

    The depth (r18/r34/r50/r100) and embedding size are read from the file.
    """
    graph = _read_onnx(path)
    config = infer_config(graph)
    log.info("%s: IResNet with %s blocks per stage, %d-d embedding", path, config.layers, config.embedding_size)
    model = load_onnx_weights(IResNet(config), path, graph)
    return ArcFaceTorch(model).to(device)
