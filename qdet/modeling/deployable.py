"""Detectron2's ResNet, FPN and RetinaNet head in the form an integer runtime runs.

qdet's simulation quantizes each quantized layer's *input*, and adds residuals and FPN
levels in float. An integer runtime (onnxruntime's QLinearConv / QLinearAdd) instead holds
every tensor between quantized ops as integer codes, made once by the op that produces
it and read by all its consumers. Under ``QUANT.TARGET`` (:mod:`qdet.quantization.targets`)
:func:`make_deployable` gives the model that structure, so QAT trains what deploys:

- the stem (FP conv): its output quantized (then max-pooled on the grid);
- a residual block: its input arrives quantized; the last conv of its branch and its
  shortcut conv quantize their outputs (signed), the sum after its ReLU is quantized
  (unsigned: the runtime's zero point 0 does the ReLU), and that is the block's output;
  an identity shortcut adds the quantized input itself;
- FPN: each lateral conv's output, each top-down sum and each output level (p3 ...) are
  quantized; upsampling keeps a tensor on its grid (nearest neighbour);
- P6 / P7: their outputs are quantized; P7's input keeps its own (unsigned) quantizer;
- the head: its first convs read the quantized levels; the predictors' outputs (the
  logits and box deltas, the graph's outputs) are quantized at 8 bits, min / max
  calibrated, when the predictors are quantized (``QUANT.TARGET_EDGE_BITS`` 8); float
  predictors instead read the head's last conv output quantized at 8 bits.

Convs whose input had its own quantizer and whose producer feeds nothing else (conv2 of a
block, the head's inner convs) keep it: one quantizer per tensor either way. The classes
below are Detectron2's, with the same children and parameter names (FP checkpoints load),
plus the quantizers; a model is converted in place by switching each module's class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from qdet.modeling.deployable_attention import (
    DEPLOYABLE_ATTENTION,
    add_attention_quantizers,
    attention_is_quantized,
)
from qdet.modeling.deployable_pyramid import (
    DEPLOYABLE_PYRAMID,
    DeploySimpleFeaturePyramid,
    add_pyramid_quantizers,
    covered_paths,
    pyramid_is_quantized,
)
from qdet.modeling.deployable_rcnn import (
    DEPLOYABLE_RCNN,
    add_rcnn_quantizers,
    rcnn_head_is_quantized,
)
from qdet.quantization.folding import FOLDABLE, check_foldable, foldable
from qdet.quantization.layers import QConv2d, QLinear, QuantizedInput
from qdet.quantization.per_level import PerLevelQuantizer
from qdet.quantization.produced import produce, same_grid
from qdet.quantization.targets import DeployTarget

MakeQuantizer = Callable[[bool | None], nn.Module]  # signed -> an activation quantizer
# The layers QFD keeps in float (DEFAULT_EXCLUDE) that sit in a deployable graph: with
# QUANT.TARGET_EDGE_BITS 8 they are quantized at 8 bits, as onnxruntime's quantizer does.
EDGE_LAYERS = (r"(^|\.)bottom_up\.stem\.conv1$", r"(^|\.)head\.(cls_score|bbox_pred)$")


class DeployBasicStem(BasicStem):
    """BasicStem with its output quantized (``output_quantizer``) before the max-pool."""

    output_quantizer: nn.Module

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        x = produce(self.output_quantizer, x)
        return same_grid(F.max_pool2d(x, kernel_size=3, stride=2, padding=1), x)


class _DeployResidual:
    """The forward of a residual block whose tensors are quantized once (module docstring)."""

    branch: tuple[str, ...]
    residual_quantizer: nn.Module
    output_quantizer: nn.Module

    def forward(self, x):
        convs = [getattr(self, name) for name in self.branch]
        out = x
        for conv in convs[:-1]:
            out = F.relu_(conv(out))
        out = produce(self.residual_quantizer, convs[-1](out))
        if self.shortcut is not None:
            shortcut = produce(self.shortcut_quantizer, self.shortcut(x))
        else:
            shortcut = x
        return produce(self.output_quantizer, F.relu(out + shortcut))


class DeployBasicBlock(_DeployResidual, BasicBlock):
    branch = ("conv1", "conv2")


class DeployBottleneckBlock(_DeployResidual, BottleneckBlock):
    branch = ("conv1", "conv2", "conv3")


class DeployFPN(FPN):
    """FPN whose laterals, top-down sums and outputs are quantized (module docstring)."""

    lateral_quantizers: nn.ModuleList
    sum_quantizers: nn.ModuleList
    output_quantizers: nn.ModuleList

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        prev = produce(
            self.lateral_quantizers[0], self.lateral_convs[0](bottom_up[self.in_features[-1]])
        )
        results = [produce(self.output_quantizers[0], self.output_convs[0](prev))]
        for idx in range(1, len(self.lateral_convs)):
            features = bottom_up[self.in_features[-idx - 1]]
            top_down = same_grid(F.interpolate(prev, scale_factor=2.0, mode="nearest"), prev)
            lateral = produce(self.lateral_quantizers[idx], self.lateral_convs[idx](features))
            prev = produce(self.sum_quantizers[idx - 1], lateral + top_down)
            results.insert(0, produce(self.output_quantizers[idx], self.output_convs[idx](prev)))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up:
                top_in = bottom_up[self.top_block.in_feature]
            else:
                top_in = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_in))
        return dict(zip(self._out_features, results))


class DeployLastLevelP6P7(LastLevelP6P7):
    p6_quantizer: nn.Module
    p7_quantizer: nn.Module

    def forward(self, c5):
        p6 = produce(self.p6_quantizer, self.p6(c5))
        return [p6, produce(self.p7_quantizer, self.p7(F.relu(p6)))]


class DeployLastLevelMaxPool(LastLevelMaxPool):
    # False when no head reads the level (Mask R-CNN's RPN on p2-p5): the exporter drops
    # it from the graph, so it has no QuantizeLinear there and none here.
    read = True

    def forward(self, x):
        pooled = F.max_pool2d(x, kernel_size=1, stride=2, padding=0)
        return [same_grid(pooled, x) if self.read else pooled]


class DeployRetinaNetHead(RetinaNetHead):
    """RetinaNetHead with each subnet's BN folded into its conv and, per predictor, either
    its output quantized (``cls_output_quantizer``; a quantized predictor) or its input
    (``cls_input_quantizer``; a float predictor reading the integer head)."""

    def forward(self, features):
        logits, bbox_reg = [], []
        for feature in features:
            logits.append(self._branch("cls", feature))
            bbox_reg.append(self._branch("bbox", feature))
        return logits, bbox_reg

    def _branch(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        x = run_subnet(getattr(self, f"{name}_subnet"), feature)
        predictor = self.cls_score if name == "cls" else self.bbox_pred
        if isinstance(predictor, QConv2d):
            return produce(getattr(self, f"{name}_output_quantizer"), predictor(x))
        return predictor(produce(getattr(self, f"{name}_input_quantizer"), x))


def run_subnet(subnet: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A head subnet [conv, norm, ReLU] * k with each norm handed to its conv to fold."""
    layers = list(subnet)
    i = 0
    while i < len(layers):
        norm = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layers[i], QConv2d) and isinstance(norm, FOLDABLE):
            x = layers[i](x, norm=norm)
            i += 2
        else:
            x = layers[i](x)
            i += 1
    return x


# -- conversion ---------------------------------------------------------------------------
_DEPLOYABLE = {
    BasicStem: DeployBasicStem,
    BasicBlock: DeployBasicBlock,
    BottleneckBlock: DeployBottleneckBlock,
    FPN: DeployFPN,
    LastLevelP6P7: DeployLastLevelP6P7,
    LastLevelMaxPool: DeployLastLevelMaxPool,
    RetinaNetHead: DeployRetinaNetHead,
    **DEPLOYABLE_ATTENTION,
    **DEPLOYABLE_RCNN,
    **DEPLOYABLE_PYRAMID,
}


def make_deployable(
    model: nn.Module,
    target: DeployTarget,
    activation: MakeQuantizer,
    edge: Callable[..., nn.Module],
    per_level_head: bool = False,
) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Convert ``model``'s quantized ResNet / FPN / RetinaNet head in place to the
    structure ``target`` runs (module docstring). ``activation(signed)`` makes the
    quantizers of tensors between quantized layers, ``edge(signed, **options)`` the 8-bit
    ones of the graph's outputs (``percentiles=(0, 100)``) and of tensors a float layer
    reads. Returns ``{path: (owner module, quantizer)}`` of the added ones.

    Quantized Linears (a ViT's or Swin's, Mask R-CNN's box head) run as integer GEMMs
    (:func:`qdet.quantization.integer_ops.integer_linear`); an attention whose qkv and proj
    are quantized runs its two matmuls in integers too
    (:mod:`qdet.modeling.deployable_attention`); norms, GELU and softmax stay float. Mask
    R-CNN's heads: :mod:`~qdet.modeling.deployable_rcnn`; ViTDet's pyramid:
    :mod:`~qdet.modeling.deployable_pyramid`.

    Raises ``ValueError`` naming the layer when a quantized conv would not be an integer
    op: a norm that cannot fold, a module of unknown structure, FPN's average fusion."""
    added = {}
    modules = dict(model.named_modules())
    # FPNs with quantized convs (a Swin's float FPN stays float, its tensors too) and their
    # top blocks (another pyramid's, ViTDet's SimpleFeaturePyramid, unquantized, stay).
    fpns = [m for m in modules.values() if isinstance(m, FPN) and _fpn_is_quantized(m)]
    fpn_tops = {id(m.top_block) for m in fpns if m.top_block}
    for path, module in modules.items():
        cls = _DEPLOYABLE.get(type(module))
        if cls is None:
            continue
        if isinstance(module, (LastLevelMaxPool, LastLevelP6P7)) and id(module) not in fpn_tops:
            continue
        if isinstance(module, FPN) and module not in fpns:
            continue
        if cls in DEPLOYABLE_ATTENTION.values() and not attention_is_quantized(module, path):
            continue  # an MLP-only model's attention: float
        if cls in DEPLOYABLE_RCNN.values() and not rcnn_head_is_quantized(module):
            continue  # a ViTDet's or Swin's float heads
        if cls is DeploySimpleFeaturePyramid and not pyramid_is_quantized(module):
            continue  # ViTDet's pyramid, float unless QUANT.INCLUDE selects its convs
        module.__class__ = cls
        found = _add_quantizers(module, path, activation, edge, per_level_head, bool(fpns))
        for name, quantizer in found:
            added[f"{path}.{name}" if path else name] = (module, quantizer)
    _mark_unread_levels(model, fpns)
    _check_covered(model, target)
    return added


def _resnet_outputs(bottom_up: nn.Module) -> bool:
    """Whether ``bottom_up``'s outputs are quantized residual blocks' (converted)."""
    return any(
        isinstance(m, (BasicBlock, BottleneckBlock))
        and any(isinstance(c, QConv2d) for c in m.modules())
        for m in bottom_up.modules()
    )


def _fpn_is_quantized(fpn: FPN) -> bool:
    return any(isinstance(c, QConv2d) for c in [*fpn.lateral_convs, *fpn.output_convs])


def _mark_unread_levels(model: nn.Module, fpns: list) -> None:
    """A top block's level no head reads (:class:`DeployLastLevelMaxPool`)."""
    read = set()
    for reader in (
        model,
        getattr(model, "proposal_generator", None),
        getattr(model, "roi_heads", None),
    ):
        for attr in ("head_in_features", "in_features"):
            read |= set(getattr(reader, attr, None) or ())
    if not read:
        return  # not a detector whose heads say what they read: keep every level
    for fpn in fpns:
        if isinstance(fpn.top_block, DeployLastLevelMaxPool):
            fpn.top_block.read = bool(set(fpn._out_features[len(fpn.lateral_convs) :]) & read)


def _add_quantizers(module, path, activation, edge, per_level_head, levels_quantized):
    """Give a converted module its quantizers and mark the convs whose input arrives
    quantized; yields (attribute, quantizer)."""

    def consume(conv: nn.Module) -> None:
        if isinstance(conv, QConv2d):
            conv.input_quantizer = QuantizedInput(conv.input_quantizer.bits)

    if type(module) in DEPLOYABLE_ATTENTION.values():
        yield from add_attention_quantizers(module, activation, edge)
    elif type(module) in DEPLOYABLE_RCNN.values():
        yield from add_rcnn_quantizers(module, activation, edge, levels_quantized)
    elif isinstance(module, DeploySimpleFeaturePyramid):
        yield from add_pyramid_quantizers(module, activation)
    elif isinstance(module, DeployBasicStem):
        module.output_quantizer = activation(False)
        yield "output_quantizer", module.output_quantizer
    elif isinstance(module, _DeployResidual):
        consume(getattr(module, module.branch[0]))
        module.residual_quantizer = activation(True)
        yield "residual_quantizer", module.residual_quantizer
        if module.shortcut is not None:
            consume(module.shortcut)
            module.shortcut_quantizer = activation(True)
            yield "shortcut_quantizer", module.shortcut_quantizer
        module.output_quantizer = activation(False)
        yield "output_quantizer", module.output_quantizer
    elif isinstance(module, DeployFPN):
        if module._fuse_type != "sum":
            raise ValueError(
                f"{path}: FPN FUSE_TYPE {module._fuse_type!r} halves the top-down sum, which "
                "is no integer op; the deployment targets take MODEL.FPN.FUSE_TYPE sum"
            )
        levels = len(module.lateral_convs)
        owned = {id(m): n for n, m in module.named_children()}
        conv_names = [owned[id(c)] for c in [*module.lateral_convs, *module.output_convs]]
        # A ResNet's stages arrive quantized (their blocks' outputs); a Swin's do not, and
        # each lateral conv then quantizes its input itself.
        laterals = list(module.lateral_convs) if _resnet_outputs(module.bottom_up) else []
        for conv in [*laterals, *module.output_convs]:
            consume(conv)
        for i, conv in enumerate([*module.lateral_convs, *module.output_convs]):
            if isinstance(conv, QConv2d) and not foldable(conv.norm):
                # A LayerNorm (ViTDet's and Swin's FPN): the conv integer, its output
                # quantized, the norm in float after.
                conv.norm_input_quantizer = activation(True)
                yield f"{conv_names[i]}.norm_input_quantizer", conv.norm_input_quantizer
        module.lateral_quantizers = nn.ModuleList(activation(True) for _ in range(levels))
        module.sum_quantizers = nn.ModuleList(activation(True) for _ in range(levels - 1))
        module.output_quantizers = nn.ModuleList(activation(True) for _ in range(levels))
        for name in ("lateral_quantizers", "sum_quantizers", "output_quantizers"):
            for i, q in enumerate(getattr(module, name)):
                yield f"{name}.{i}", q
    elif isinstance(module, DeployLastLevelP6P7):
        consume(module.p6)
        module.p6_quantizer, module.p7_quantizer = activation(True), activation(True)
        yield "p6_quantizer", module.p6_quantizer
        yield "p7_quantizer", module.p7_quantizer
    elif isinstance(module, DeployRetinaNetHead):
        for name, predictor in (("cls", module.cls_score), ("bbox", module.bbox_pred)):
            subnet = getattr(module, f"{name}_subnet")
            consume(next((m for m in subnet if isinstance(m, nn.Conv2d)), None))
            _check_subnet(subnet, f"{path}.{name}_subnet")
            if isinstance(predictor, QConv2d):  # its own input quantizer; quantize its output
                # The graph's outputs: min / max, whatever QUANT.CALIB_RANGE (the largest
                # logits are the detections).
                attr = f"{name}_output_quantizer"

                def make():
                    return edge(True, percentiles=(0, 100), calib_range="minmax")

            else:
                attr, make = f"{name}_input_quantizer", lambda: edge(False)
            quantizer = make()
            if per_level_head:
                quantizer = PerLevelQuantizer(module._num_features, make)
            setattr(module, attr, quantizer)
            yield attr, quantizer


def _check_subnet(subnet: nn.Sequential, path: str) -> None:
    layers = list(subnet)
    for i, layer in enumerate(layers):
        if isinstance(layer, QConv2d):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            is_norm = nxt is not None and not isinstance(nxt, (nn.ReLU, nn.Conv2d))
            check_foldable(nxt if is_norm else None, f"{path}.{i + 1}")


# Modules whose quantized convs the conversion puts in integer form.
_COVERED = tuple(_DEPLOYABLE.values())
_COVERED_NAMES = ", ".join(
    f"{c.__name__} (its stages)" if c in DEPLOYABLE_PYRAMID else c.__name__ for c in _DEPLOYABLE
)


def _check_covered(model: nn.Module, target: DeployTarget) -> None:
    """Every quantized layer must sit in a converted module, with a foldable norm."""
    owners: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, _COVERED):
            if isinstance(module, DeploySimpleFeaturePyramid):  # its stages, not its ViT
                names = covered_paths(module)
            else:
                names = [name for name, _ in module.named_modules() if name]
            for name in names:
                owners.setdefault(f"{path}.{name}" if path else name, path)
    quantized = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    if not quantized:
        raise ValueError(
            f"QUANT.TARGET {target.name!r} with no quantized layer: QUANT.TARGETS / "
            "QUANT.EXCLUDE leave every layer in float, so nothing would run in integers. "
            "Select layers to quantize (e.g. QUANT.TARGETS ['mha', 'mlp'] for a ViT or "
            "Swin) or use QUANT.TARGET ''"
        )
    for layer in quantized:
        if isinstance(layer, QLinear):  # its own input quantizer; the integer GEMM's bias
            layer.target = target
    for path, layer in model.named_modules():
        if not isinstance(layer, QConv2d):
            continue
        if path not in owners:
            raise ValueError(
                f"{path}: a quantized conv outside the modules QUANT.TARGET "
                f"{target.name!r} can run in integers ({_COVERED_NAMES}); exclude it "
                "(QUANT.EXCLUDE) or use QUANT.TARGET ''"
            )
        if getattr(layer, "norm_input_quantizer", None) is None:
            check_foldable(layer.norm, f"{path}.norm")
        layer.target = target
