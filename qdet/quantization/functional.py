"""The uniform fake-quantization op of QFD (Eq. 1-5) as one autograd Function.

For a tensor v, bounds l < u, n = 2^b - 1 and an output map (A, B):

    t       = (v - l) / (u - l)
    v_hat   = clip(t, 0, 1)                                  (QFD Eq. 1)
    v_tilde = round(n * v_hat) / n                           (QFD Eq. 2, half to even)
    out     = A * v_tilde + B                                (QFD Eq. 3-4)

with (A, B) = (2s, -s) for weights (= s * 2 * (v_tilde - 0.5)), (alpha, 0) for unsigned
activations and (alpha, l) for signed activations. The backward is the straight-through
estimator (QFD Eq. 5) or, with delta given, EWGS's element-wise gradient scaling at the
rounding (EWGS Eq. 5, in its official code's units: the discretiser's [0, 1] input and
output, not codes):

    dL/dv_hat = g * (1 + delta * sign(g) * (v_hat - v_tilde)),   g = dL/dv_tilde

The clip's gradient at exactly t = 0 or t = 1 is a choice (``inclusive``): EWGS's runs
passed it (the clamp of their PyTorch), torch 2.14's ``torch.clamp`` blocks it.

Why a custom Function: autograd through the plain formula keeps about six full-size
intermediates alive per quantizer. This one saves only the input and recomputes in the
backward. Its elementwise bodies are passed through ``torch.compile`` (dynamic shapes,
since detector activations change size from batch to batch) where a compiler works, and
fall back to eager PyTorch elsewhere. ``QDET_QUANT_BACKEND`` = ``auto`` | ``compile`` |
``eager`` picks; ``auto`` compiles and silently falls back on failure.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable

import torch

# set_backend: re-exported here, where the backend is used (the flag lives in modes)
from qdet.quantization.modes import get_backend, set_backend  # noqa: F401

logger = logging.getLogger(__name__)

# Output maps: out = A * v_tilde + B.
MODE_WEIGHT = 0  # A = 2s, B = -s
MODE_UNSIGNED = 1  # A = alpha, B = 0
MODE_SIGNED = 2  # A = alpha, B = l


def _output_map(mode: int, lower: torch.Tensor, scale: torch.Tensor):
    if mode == MODE_WEIGHT:
        return scale * 2, -scale
    if mode == MODE_UNSIGNED:
        return scale, None
    return scale, lower


def fake_quant_reference(
    x: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    mode: int,
    inclusive: bool = False,
) -> torch.Tensor:
    """The plain autograd composition of QFD Eq. 1-5 (straight-through round).

    ``inclusive``: the clip passes gradient on [0, 1] (EWGS's runs) instead of (0, 1)
    (``torch.clamp``). This is the definition the fused op is tested against.
    """
    t = (x - lower) / (upper - lower)
    v_hat = torch.clamp(t, 0, 1)
    if inclusive:
        v_hat = torch.where((t >= 0) & (t <= 1), t, v_hat)
    scaled = n * v_hat
    v_tilde = (scaled + (torch.round(scaled) - scaled).detach()) / n
    if mode == MODE_WEIGHT:
        return scale * 2 * (v_tilde - 0.5)
    if mode == MODE_UNSIGNED:
        return scale * v_tilde
    return lower + scale * v_tilde


def _forward_body(x, lower, upper, scale, n: int, mode: int):
    """Forward values, written so that they equal ``fake_quant_reference`` bit for bit."""
    v_hat = torch.clamp((x - lower) / (upper - lower), 0, 1)
    v_tilde = torch.round(n * v_hat) / n
    if mode == MODE_WEIGHT:
        return scale * 2 * (v_tilde - 0.5)
    if mode == MODE_UNSIGNED:
        return scale * v_tilde
    return lower + scale * v_tilde


def _forward_codes_body(x, lower, upper, scale, n: int, mode: int):
    """``_forward_body``'s values and, from the same pass, the codes k = round(n v_hat)
    (uint8): what a layer that saves its input as codes keeps for backward."""
    v_hat = torch.clamp((x - lower) / (upper - lower), 0, 1)
    codes = torch.round(n * v_hat)
    return _decode_body(codes, lower, scale, n, mode), codes.to(torch.uint8)


def _decode_body(codes, lower, scale, n: int, mode: int):
    """The fake-quantized values of codes k (any dtype holding the integers), with the
    forward's arithmetic: the same expression as ``_forward_body`` after its round."""
    v_tilde = codes.float() / n
    if mode == MODE_WEIGHT:
        return scale * 2 * (v_tilde - 0.5)
    if mode == MODE_UNSIGNED:
        return scale * v_tilde
    return lower + scale * v_tilde


def _backward_body(
    g, x, lower, upper, scale, delta, n: int, mode: int, reduce_dims, inclusive: bool
):
    """Gradients of QFD Eq. 1-5 w.r.t. x, l, u and the scale, from the input alone.

    With d = u - l and m = [0 < t < 1] ([0 <= t <= 1] when ``inclusive``):
        dt/dx = 1/d,  dt/dl = (t - 1)/d,  dt/du = -t/d,  d out/d v_tilde = A.
    The exclusive mask equals torch.clamp's gradient (torch 2.14), so this equals autograd
    through ``fake_quant_reference`` also on values exactly at l or u (ReLU zeros with
    l = 0 are such values).
    """
    d = upper - lower
    t = (x - lower) / d
    inside = (t >= 0) & (t <= 1) if inclusive else (t > 0) & (t < 1)
    v_hat = torch.clamp(t, 0, 1)
    v_tilde = torch.round(n * v_hat) / n
    amp, _ = _output_map(mode, lower, scale)
    g_v = g * amp  # gradient w.r.t. v_tilde (= w.r.t. v_hat under the STE)
    if delta is not None:
        # EWGS: scale the gradient by how far the rounding moved the value, in the
        # discretiser's [0, 1] units. Detached: EWGS's discretiser saves this difference
        # as a constant, so a second derivative (its Hessian estimate) does not see it.
        g_v = g_v * (1 + delta * torch.sign(g_v) * (v_hat - v_tilde).detach())
    g_t = torch.where(inside, g_v, torch.zeros_like(g_v)) / d
    grad_x = g_t
    grad_lower = (g_t * (t - 1)).sum(reduce_dims)
    grad_upper = -(g_t * t).sum(reduce_dims)
    if mode == MODE_WEIGHT:
        grad_scale = (g * (2 * v_tilde - 1)).sum(reduce_dims)
    else:
        grad_scale = (g * v_tilde).sum(reduce_dims)
    if mode == MODE_SIGNED:
        grad_lower = grad_lower + g.sum(reduce_dims)
    return grad_x, grad_lower, grad_upper, grad_scale


_compiled: dict[str, Callable | None] = {}


# Graph variants: 3 output maps x (per tensor | per channel) x (STE | EWGS) x devices x
# the n = 1 special case. Inputs are flattened first, so shapes add no variants; past
# dynamo's default of 8 it would silently stop compiling.
_RECOMPILE_LIMIT = 64
# Newer torch takes the limit per compiled function (2.14 does); older torch only has the global
# config, patched around each call (a context that costs about as much as the call).
_PER_FUNCTION_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


def _body(name: str, fn: Callable) -> Callable:
    if get_backend() == "eager":
        return fn
    if name not in _compiled:
        limit = {"recompile_limit": _RECOMPILE_LIMIT} if _PER_FUNCTION_LIMIT else {}
        _compiled[name] = torch.compile(fn, dynamic=True, **limit)
    if _compiled[name] is None and get_backend() == "compile":
        # Never eager under "compile": a test or benchmark of the compiled op must not
        # silently measure the eager one.
        raise RuntimeError(
            f"QDET_QUANT_BACKEND=compile, but the quantizer body {name!r} has no compiled "
            "form (torch.compile gave none, or it failed earlier under 'auto'): use "
            "QDET_QUANT_BACKEND=auto or eager, or fix the compiler (torch._inductor)"
        )
    return _compiled[name] or fn


def _run(name: str, fn: Callable, *args):
    """Run ``fn`` compiled, falling back to eager (for good, in auto mode) if compiling fails."""
    compiled = _body(name, fn)
    if compiled is fn:
        return fn(*args)
    # The flattened input is a view of the layer's tensor; given the view, dynamo guards on
    # its base's sizes and strides (e.g. H == W of that feature map) and recompiles when a
    # new image size breaks them. A detached alias has no base. Only called where no
    # autograd graph is built (inside the Function's forward, or a first-order backward).
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    limit = (
        contextlib.nullcontext()
        if _PER_FUNCTION_LIMIT
        else torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)
    )
    try:
        with limit:
            return compiled(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure means "use eager"
        if get_backend() == "compile":
            raise
        logger.warning("torch.compile of the quantizer failed (%s); using eager PyTorch", e)
        _compiled[name] = None
        return fn(*args)


class ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` (LSQ's gradient scale, bit-exact value).

    LSQ's own ``(s - s g).detach() + s g`` changes s by float rounding, which would tie the
    quantized values to the tensor size N through g = 1 / sqrt(N Q_p).
    """

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _in_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fake_quantized(x, lower, upper, scale, n: int, mode: int) -> torch.Tensor:
    """The compiled forward's values of a flattened ``x``, in ``x``'s dtype: what
    :class:`FakeQuantize` returns and :func:`fake_quantize_values` rebuilds, one code path
    so the two agree bit for bit."""
    return _run("forward", _forward_body, _in_float32(x), lower, upper, scale, n, mode).to(x.dtype)


class FakeQuantize(torch.autograd.Function):
    """Uniform fake quantization with a recomputing backward. See the module docstring."""

    @staticmethod
    def forward(ctx, x, lower, upper, scale, n, mode, delta, reduce_dims, inclusive, codes):
        # The codes output never gets a gradient: without this, autograd would hand the
        # backward a zero-filled tensor of the activation's size for it on every call.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, lower, upper, scale)
        ctx.n, ctx.mode, ctx.delta, ctx.reduce_dims = n, mode, delta, reduce_dims
        ctx.inclusive = inclusive
        if not codes:
            return _fake_quantized(x, lower, upper, scale, n, mode)
        xf = _in_float32(x)
        out, k = _run("forward_codes", _forward_codes_body, xf, lower, upper, scale, n, mode)
        ctx.mark_non_differentiable(k)
        return out.to(x.dtype), k

    @staticmethod
    def backward(ctx, g, _g_codes=None):
        if g is None:  # the output was not used by the loss
            return (None,) * 10
        x, lower, upper, scale = ctx.saved_tensors
        g32, x32 = g.float(), x.float()
        args = (g32, x32, lower, upper, scale, ctx.delta, ctx.n, ctx.mode, ctx.reduce_dims)
        args += (ctx.inclusive,)
        if torch.is_grad_enabled():
            # create_graph=True (e.g. EWGS's Hessian estimate): stay differentiable.
            grads = _backward_body(*args)
        else:
            grads = _run("backward", _backward_body, *args)
        grad_x, grad_l, grad_u, grad_s = grads
        grad_x = grad_x.to(x.dtype)
        return (
            grad_x,
            grad_l.view_as(lower),
            grad_u.view_as(upper),
            grad_s.view_as(scale),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fake_quantize(
    x: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    mode: int,
    delta: float | torch.Tensor | None = None,
    per_channel: bool = False,
    inclusive: bool = False,
    return_codes: bool = False,
    levels: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """QFD's uniform fake quantization (Eq. 1-5) of ``x``.

    ``lower``, ``upper`` and ``scale`` are scalars, or vectors over dim 0 of ``x`` when
    ``per_channel``. ``delta`` turns on EWGS gradient scaling (None or 0: the STE).
    ``inclusive``: the clip's gradient passes at exactly l and u (see the module docstring).
    ``return_codes``: also the integer codes k = round(n v_hat) as uint8 (bits <= 8), from
    the same pass; :func:`decode_codes` turns them back into the output bit for bit.
    ``levels``: n, the top code, when not 2^bits - 1 (a deployment target's 8-bit weights
    use 254, the narrow int8 grid; :mod:`qdet.quantization.targets`).
    """
    n = levels or 2**bits - 1
    flat, (lower, upper, scale), reduce_dims = _flattened(x, (lower, upper, scale), per_channel)
    if isinstance(delta, (int, float)):
        # A tensor delta (EWGS's buffer) is used as is: comparing it here would sync the GPU.
        delta = None if delta == 0 else torch.tensor(float(delta), device=x.device)
    args = (flat, lower, upper, scale, n, mode, delta, reduce_dims, inclusive)
    if not return_codes:
        return FakeQuantize.apply(*args, False).view(x.shape)
    if n > 255:
        raise ValueError(f"uint8 codes hold at most 8 bits; got {bits}")
    out, codes = FakeQuantize.apply(*args, True)
    return out.view(x.shape), codes.view(x.shape)


def _flattened(x: torch.Tensor, params: tuple, per_channel: bool):
    """``x`` as 1-D (or channels x rest), the parameters shaped to broadcast over it, and
    the dims a parameter's gradient sums over: one compiled graph then serves every shape."""
    if per_channel:
        return x.reshape(x.shape[0], -1), tuple(p.view(-1, 1) for p in params), (1,)
    return x.reshape(-1), params, (0,)


def fake_quantize_values(
    x: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    mode: int,
    per_channel: bool = False,
    levels: int | None = None,
) -> torch.Tensor:
    """``fake_quantize``'s values without autograd (no graph, nothing saved): the same
    compiled forward on the same flattened layout, so bit for bit its output. What a
    layer's backward rebuilds its fake-quantized weight with."""
    with torch.no_grad():
        flat, (lower, upper, scale), _ = _flattened(x, (lower, upper, scale), per_channel)
        n = levels or 2**bits - 1
        return _fake_quantized(flat, lower, upper, scale, n, mode).view(x.shape)


def decode_codes(
    codes: torch.Tensor,
    lower: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    mode: int,
    per_channel: bool = False,
    levels: int | None = None,
) -> torch.Tensor:
    """The float32 values of ``fake_quantize``'s codes: one fused pass (compiled like the
    forward, flattened the same way, so the arithmetic is the forward's)."""
    flat, (lower, scale), _ = _flattened(codes, (lower, scale), per_channel)
    n = levels or 2**bits - 1
    return _run("decode", _decode_body, flat, lower, scale, n, mode).view(codes.shape)
