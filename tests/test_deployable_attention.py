"""ViTDet's and Swin's attention under a deployment target (qdet/modeling/deployable_attention.py):
what the converted module computes, against the integer arithmetic written out head by head."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone.utils import add_decomposed_rel_pos

from qdet.config import load_config
from qdet.modeling.deployable_attention import DeployViTAttention, DeployWindowAttention
from qdet.quantization import calibrate
from qdet.quantization.layers import QuantizedInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = ["MODEL.WEIGHTS", "", "QUANT.TARGET", "onnxruntime"]


def _grid(x: torch.Tensor, quantizer) -> torch.Tensor:
    """A runtime's QuantizeLinear then DequantizeLinear, from the integer grid's fields."""
    g = quantizer.integer_grid()
    codes = torch.clamp(torch.round(x / g.q_step) + g.zero_point, 0, g.n)
    return (codes - g.zero_point) * g.dq_step


def _proj(attention, x: torch.Tensor) -> torch.Tensor:
    """proj on its quantized input: the weight's integers times their step, the bias
    rounded to the int32 grid s_x s_w[c]."""
    proj = attention.proj
    q, s_w = proj.weight_quantizer.weight_integers(proj.weight)
    s_x = attention.output_quantizer.integer_grid().dq_step
    step = s_x * s_w
    return x @ (q.float() * s_w.view(-1, 1)).T + torch.round(proj.bias / step) * step


def _heads(attention, tokens: torch.Tensor, logits_terms, b: int) -> torch.Tensor:
    """One image's attention, head by head, on the qkv codes' values ``tokens`` (N, 3C)."""
    C = tokens.shape[1] // 3
    d = C // attention.num_heads
    out = torch.zeros(tokens.shape[0], C)
    for h in range(attention.num_heads):
        q, k, v = (tokens[:, s * C + h * d : s * C + (h + 1) * d] for s in range(3))
        logits = logits_terms((q * d**-0.5) @ k.T, q, b, h)
        probs = _grid(torch.softmax(logits, dim=-1), attention.probs_quantizer)
        out[:, h * d : (h + 1) * d] = probs @ v
    return _grid(out, attention.output_quantizer)


def _target_model(config: str, bits: str):
    opts = [*TARGET, "QUANT.W_BITS", bits, "QUANT.A_BITS", bits]
    torch.manual_seed(0)
    model = build_model(load_config(os.path.join(ROOT, config), opts)).eval()
    with torch.no_grad():  # logits of a trained model's size (initialised, they are ~0.1)
        for m in model.modules():
            if isinstance(m, (DeployViTAttention, DeployWindowAttention)):
                m.qkv.weight.mul_(10)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 255, (3, 160, 160), generator=g).float()
    calibrate(model, [[{"image": image}]], num_batches=1)
    return model


def _assert_equal_but_ties(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float rounding; an element may differ by a code at a rounding boundary
    (float sums in another order), rarely."""
    off = (got - want).abs() > 1e-4 * (1 + want.abs())
    assert off.float().mean() < 2e-3, f"{int(off.sum())} of {off.numel()} differ"


@pytest.mark.parametrize("bits", ["8", "4"])
def test_vit_attention_is_integer_matmuls_on_the_qkv_codes(bits):
    """q, k, v on qkv's output grid, 1/sqrt(d) on q, the relative positions in float, the
    probabilities and attn v quantized, proj reading those codes."""
    model = _target_model("configs/digits/vitdet_tiny_4bit.yaml", bits)
    attention = model.backbone.net.blocks[1].attn  # a global block, relative positions on
    assert isinstance(attention, DeployViTAttention) and attention.use_rel_pos
    assert isinstance(attention.proj.input_quantizer, QuantizedInput)
    g = torch.Generator().manual_seed(2)
    B, H, W, C = 2, 4, 5, attention.qkv.in_features
    x = torch.randn(B, H, W, C, generator=g)
    with torch.no_grad():
        got = attention(x)
        tokens = _grid(attention.qkv(x), attention.qkv_quantizer).reshape(B, H * W, 3 * C)

        def rel_pos(logits, q, b, h):
            return add_decomposed_rel_pos(
                logits[None], q[None], attention.rel_pos_h, attention.rel_pos_w, (H, W), (H, W)
            )[0]

        mixed = torch.stack([_heads(attention, tokens[b], rel_pos, b) for b in range(B)])
        want = _proj(attention, mixed).reshape(B, H, W, C)
    _assert_equal_but_ties(got, want)


def test_swin_window_attention_adds_its_bias_and_mask_in_float():
    model = _target_model("configs/digits/swin_tiny_4bit.yaml", "8")
    attention = next(m for m in model.modules() if isinstance(m, DeployWindowAttention))
    g = torch.Generator().manual_seed(3)
    windows, N, C = 2, attention.window_size[0] * attention.window_size[1], attention.dim
    x = torch.randn(2 * windows, N, C, generator=g)
    mask = torch.where(torch.rand(windows, N, N, generator=g) < 0.3, -100.0, 0.0)
    table = attention.relative_position_bias_table
    bias = table[attention.relative_position_index.view(-1)].view(N, N, -1)
    with torch.no_grad():
        got = attention(x, mask)
        tokens = _grid(attention.qkv(x), attention.qkv_quantizer)

        def bias_and_mask(logits, q, b, h):
            return logits + bias[:, :, h] + mask[b % windows]

        mixed = torch.stack([_heads(attention, tokens[b], bias_and_mask, b) for b in range(len(x))])
        want = _proj(attention, mixed)
    _assert_equal_but_ties(got, want)
    assert bias.abs().max() > 0 and mask.min() < 0  # both terms matter
