"""EWGS's per-layer gradient-scaling factor from a Hutchinson estimate of the Hessian trace.

EWGS (Lee, Kim, Ham 2021, Eq. 9) sets, for each quantizer,

    delta = clip( mean over batches of  (Tr(H) / N) / (3 std(g)),  0, inf )

where g and H are the gradient and Hessian of the loss w.r.t. the quantizer's normalised
output (v_tilde for activations, 2 v_tilde - 1 for weights, as in EWGS's official code)
and N its number of elements. We hook the de-quantized output out = c * v + b, so
g_v = c g_out and H_v = c^2 H_out, hence delta = |c| (Tr(H_out) / N) / (3 std(g_out)).
Tr(H_out) ~ E[z^T H z] with Rademacher z (Hutchinson).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from qdet.quantization.quantizers import EWGSQuantizer


def _hutchinson_trace(grad: torch.Tensor, value: torch.Tensor, samples: int) -> float:
    total = 0.0
    for _ in range(samples):
        z = torch.randint_like(value, 2) * 2 - 1
        # The graph is kept: the other quantizers' traces reuse it.
        (hz,) = torch.autograd.grad(grad, value, z, retain_graph=True)
        total += (z * hz).sum().item()
    return total / samples


def update_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[object], torch.Tensor],
    batches: Iterable,
    num_batches: int = 3,
    samples: int = 1,
) -> dict[str, float]:
    """Re-estimate ``delta`` of every :class:`EWGSQuantizer` in ``model`` (EWGS Eq. 9).

    ``loss_fn(batch)`` runs the model and returns a scalar loss. Returns name -> delta.
    EWGS refreshes these every few epochs; :class:`qdet.engine` hooks call this.
    """
    quantizers = {
        n: m for n, m in model.named_modules() if isinstance(m, EWGSQuantizer) and m.enabled
    }
    if not quantizers:
        return {}
    outputs: dict[str, torch.Tensor] = {}

    def keep_output(name):
        def hook(_module, _inputs, out):
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(keep_output(n)) for n, m in quantizers.items()]
    sums = dict.fromkeys(quantizers, 0.0)
    seen = 0
    try:
        for batch in batches:
            if seen == num_batches:
                break
            outputs.clear()
            model.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            loss.backward(create_graph=True)
            for name, out in outputs.items():
                g = out.grad
                if g is None or g.std() == 0:
                    continue
                trace = _hutchinson_trace(g, out, samples)
                amp = quantizers[name].scale.detach().abs().mean().item()
                sums[name] += amp * (trace / out.numel()) / (3 * g.std().item())
            seen += 1
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
        model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("update_ewgs_deltas got no batches")
    deltas = {}
    for name, q in quantizers.items():
        deltas[name] = max(sums[name] / seen, 0.0)
        q.delta.fill_(deltas[name])
    return deltas
