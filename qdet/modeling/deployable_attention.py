"""ViTDet's and Swin's attention in the form an integer runtime runs (``QUANT.TARGET``).

Detectron2's attention (ViT's ``Attention``, Swin's ``WindowAttention``) with its qkv and
proj Linears quantized (``QUANT.TARGETS`` "mha") runs, under a target, as onnxruntime's
integer kernels fuse it (docs/deploy/onnxruntime_transformer_fusion.md):

- qkv: QGemm, its output quantized once (``qkv_quantizer``): q, k and v are views of
  those codes (reshape, transpose and gather run on uint8);
- q kᵀ: an integer matmul on the codes (MatMulIntegerToFloat: float logits). The scale
  1 / sqrt(d) costs nothing: it is in q's DequantizeLinear step, so in the matmul's
  requantisation;
- the logits stay float for ViTDet's decomposed relative positions (an einsum on q) and
  Swin's relative position bias and shift mask, then the float Softmax;
- the probabilities quantized (``probs_quantizer``, 8 bits, unsigned) and attn v: a
  QLinearMatMul whose output quantizer (``output_quantizer``, proj's input quantizer
  until the conversion) is proj's input, so proj is a QGemm reading codes.

Each tensor is quantized once: q, k and v share the qkv codes, the attention output is
proj's input. PyTorch computes what the runtime does up to float rounding of the integer
sums (the export check counts those ties). The Softmax stays float: both models add float
terms to the logits, and onnxruntime's QLinearSoftmax, with the logits' quantization it
needs, is 2.2-6.0x slower than the float Softmax at these shapes
(``tools/benchmark_fused_ops.py``, docs/benchmarks.md); and onnxruntime's quantizer gives
a quantized Softmax's output the fixed grid [0, 1] / 255, 40-76x coarser than MinMax's in
the tiny ViTDet's global blocks; there, quantizing the Softmax ops loses 7.0 box / 16.4
mask AP (docs/deployment.md, the accuracy study). The classes are Detectron2's, with the
same parameters (FP checkpoints load), converted in place by
:func:`qdet.modeling.deployable.make_deployable`.
"""

from __future__ import annotations

import torch
from detectron2.modeling.backbone.swin import WindowAttention
from detectron2.modeling.backbone.utils import add_decomposed_rel_pos
from detectron2.modeling.backbone.vit import Attention
from torch import nn

from qdet.quantization.integer_ops import integer_matmul
from qdet.quantization.layers import QLinear, QuantizedInput
from qdet.quantization.produced import produce, same_grid


class _DeployAttention:
    """What both attentions share: the quantizers and the two integer matmuls."""

    qkv_quantizer: nn.Module
    probs_quantizer: nn.Module
    output_quantizer: nn.Module

    def _qkv_codes(self, x: torch.Tensor, view) -> tuple[torch.Tensor, ...]:
        """q, k, v: views (``view``: the upstream reshape / permute to (3, ...)) of qkv's
        output codes."""
        qkv = produce(self.qkv_quantizer, self.qkv(x))
        stacked = same_grid(view(qkv), qkv)
        return tuple(same_grid(stacked[i], stacked) for i in range(3))

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(q / sqrt(d)) kᵀ on the codes; the scale in q's DequantizeLinear step."""
        return integer_matmul(self, same_grid(q, q, self.scale), same_grid(k.transpose(-2, -1), k))

    def _mix(self, probs: torch.Tensor, v: torch.Tensor, view) -> torch.Tensor:
        """The probabilities quantized, attn v as an integer matmul, quantized for proj and
        viewed (``view``: upstream's back to tokens) on its codes; then proj."""
        probs = produce(self.probs_quantizer, probs)
        out = produce(self.output_quantizer, integer_matmul(self, probs, v))
        return self.proj(same_grid(view(out), out))


class DeployViTAttention(_DeployAttention, Attention):
    """ViT's (ViTDet's) attention with integer matmuls (module docstring)."""

    def forward(self, x):
        B, H, W, _ = x.shape
        heads = self.num_heads
        q, k, v = self._qkv_codes(
            x,
            lambda t: (
                t.reshape(B, H * W, 3, heads, -1)
                .permute(2, 0, 3, 1, 4)
                .reshape(3, B * heads, H * W, -1)
            ),
        )
        attn = self._logits(q, k)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        return self._mix(
            attn.softmax(dim=-1),
            v,
            lambda t: t.view(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1),
        )


class DeployWindowAttention(_DeployAttention, WindowAttention):
    """Swin's window attention with integer matmuls (module docstring)."""

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        heads = self.num_heads
        q, k, v = self._qkv_codes(
            x, lambda t: t.reshape(B_, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        )
        attn = self._logits(q, k) + self._relative_position_bias().unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(B_ // windows, windows, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, N, N)
        out = self._mix(self.softmax(attn), v, lambda t: t.transpose(1, 2).reshape(B_, N, C))
        return self.proj_drop(out)

    def _relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N): upstream's table looked up by its index."""
        tokens = self.window_size[0] * self.window_size[1]
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(tokens, tokens, -1).permute(2, 0, 1).contiguous()


DEPLOYABLE_ATTENTION = {Attention: DeployViTAttention, WindowAttention: DeployWindowAttention}


def attention_is_quantized(module: nn.Module, path: str) -> bool:
    """Whether an attention's qkv and proj are both quantized (it is then converted); False
    when neither is (an MLP-only model). One without the other has no integer form."""
    quantized = [isinstance(getattr(module, n), QLinear) for n in ("qkv", "proj")]
    if all(quantized):
        drop = getattr(module, "attn_drop", None)
        if drop is not None and drop.p > 0:
            raise ValueError(
                f"{path}.attn_drop: dropout on the attention probabilities (p={drop.p}) "
                "moves them off their integer grid; a deployment target trains with "
                "attn_drop_rate 0"
            )
        return True
    if any(quantized):
        which = "qkv" if quantized[0] else "proj"
        raise ValueError(
            f"{path}: only {path}.{which} is quantized; the attention runs in integers "
            "with qkv and proj both quantized (QUANT.TARGETS ['mha'] selects both) or "
            "neither: add the other to QUANT.INCLUDE or exclude both (QUANT.EXCLUDE)"
        )
    return False


def add_attention_quantizers(module: _DeployAttention, activation, edge):
    """Give a converted attention its quantizers; yields (attribute, quantizer).
    proj's input quantizer becomes the attention's output quantizer (attn v's)."""
    module.qkv_quantizer = activation(True)
    yield "qkv_quantizer", module.qkv_quantizer
    module.probs_quantizer = edge(False, percentiles=(0, 100), calib_range="minmax")
    yield "probs_quantizer", module.probs_quantizer
    module.output_quantizer = module.proj.input_quantizer
    module.proj.input_quantizer = QuantizedInput(module.output_quantizer.bits)
    yield "output_quantizer", module.output_quantizer
