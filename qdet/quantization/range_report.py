"""Each quantizer's learned range and how much of its input it clips (SPEC "What users
struggle with", item 1: log quantizer ranges), for ``tools/inspect_quantizers.py``.

For every enabled quantizer, in the order the forward calls them: the input interval [l, u]
it maps onto its 2^b levels (QFD's l and u; LSQ's Q_n s and Q_p s; the quantized ReLU's
0 and n alpha), the step between two output levels (s / n for activations, 2 s / n for
QFD's weights, LSQ's s), and the share of its input the clip changes on the given batches:
values more than half an input step (u - l) / 2n below l or above u (closer ones round to
the end level anyway). Per-channel weights report the mean over channels of l, u and the step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qdet.quantization.functional import MODE_WEIGHT
from qdet.quantization.quantizers import Quantizer


@torch.no_grad()
def quantizer_ranges(model: nn.Module, batches: Iterable) -> list[dict]:
    """Run ``model`` on ``batches`` and return one record per quantizer: name, kind, bits,
    method, signed, per_channel, lower, upper, step, the clipped shares (below, above,
    total) over every value it quantized, and ``calls``. Quantizers the batches never reach
    come last with ``calls`` 0."""
    quantizers = {
        name: q for name, q in model.named_modules() if isinstance(q, Quantizer) and q.enabled
    }
    if not quantizers:
        raise ValueError(
            "the model has no enabled quantizer: inspect a quantized config (QUANT.ENABLED "
            "True), e.g. configs/digits/retinanet_r18_4bit_qfd.yaml"
        )
    # per quantizer: values below l, above u, values seen, calls
    counts = {name: torch.zeros(4, dtype=torch.float64) for name in quantizers}
    order: list[str] = []

    def hook(name: str):
        def count(module: Quantizer, inputs: tuple) -> None:
            x = inputs[0].detach().float()
            lower, upper, _, _ = module._affine()
            # Half an input step beyond a bound, rounding alone would give the end level:
            # only values farther out are changed by the clip (ReLU's zeros under an
            # unsigned l slightly above 0 are not).
            half = (upper - lower) / (2 * module.n_levels)
            counts[name] += torch.tensor(
                [
                    (x < module._view(lower - half, x)).sum().item(),
                    (x > module._view(upper + half, x)).sum().item(),
                    x.numel(),
                    1,
                ],
                dtype=torch.float64,
            )
            if name not in order:
                order.append(name)

        return count

    handles = [q.register_forward_pre_hook(hook(name)) for name, q in quantizers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    records = []
    for name in order + [n for n in quantizers if n not in order]:
        q = quantizers[name]
        lower, upper, scale, mode = q._affine()
        step = scale.abs() * (2 if mode == MODE_WEIGHT else 1) / q.n_levels
        below, above, total, calls = counts[name].tolist()
        records.append(
            {
                "name": name,
                "kind": q.kind,
                "bits": q.bits,
                "method": type(q).__name__,
                "signed": bool(q.signed),
                "per_channel": int(lower.numel()) if lower.numel() > 1 else 0,
                "lower": lower.float().mean().item(),
                "upper": upper.float().mean().item(),
                "step": step.float().mean().item(),
                "clipped_below": below / total if total else 0.0,
                "clipped_above": above / total if total else 0.0,
                "clipped": (below + above) / total if total else 0.0,
                "calls": int(calls),
                "values": int(total),
            }
        )
    return records


def plot_ranges(records: list[dict], path: str, title: str = "") -> None:
    """Per quantizer in network order: [l, u] as a bar, the step (log scale), and the share
    of values clipped; activations and weights in separate columns (their scales differ by
    orders of magnitude)."""
    import matplotlib  # matplotlib only where a plot is drawn (its import is slow)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib only where a plot is drawn (its import is slow)

    kinds = [k for k in ("activation", "weight") if any(r["kind"] == k for r in records)]
    longest = max(sum(r["kind"] == k for r in records) for k in kinds)
    fig, axes = plt.subplots(
        3, len(kinds), figsize=(max(6.0, 0.16 * longest) * len(kinds), 8.5), squeeze=False
    )
    for col, kind in enumerate(kinds):
        rows = [r for r in records if r["kind"] == kind]
        x = range(len(rows))
        lower = [r["lower"] for r in rows]
        height = [r["upper"] - r["lower"] for r in rows]
        ax = axes[0][col]
        ax.bar(x, height, bottom=lower, color="tab:blue", width=0.7)
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_ylabel("[l, u]")
        ax.set_title(f"{kind} quantizers ({len(rows)})")
        axes[1][col].semilogy(x, [r["step"] for r in rows], "o-", markersize=3)
        axes[1][col].set_ylabel("output step")
        axes[2][col].bar(x, [100 * r["clipped_below"] for r in rows], color="tab:orange")
        axes[2][col].bar(
            x,
            [100 * r["clipped_above"] for r in rows],
            bottom=[100 * r["clipped_below"] for r in rows],
            color="tab:red",
        )
        axes[2][col].set_ylabel("% clipped (below, above)")
        labels = [r["name"].removesuffix("_quantizer") for r in rows]
        axes[2][col].set_xticks(list(x), labels, rotation=90, fontsize=6)
        for ax in axes[0][col], axes[1][col]:
            ax.set_xticks(list(x), [""] * len(rows))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
