"""Attention-refined feature distillation, RFD (AKT Eq. 6-8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdet.distill.loss_base import DISTILL_LOSS_REGISTRY, DistillLoss

# AKT's official code multiplies the summed term by beta = 1000 inside the loss.
OFFICIAL_BETA = 1000.0


def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """AKT Eq. 6: mean over C of F^2, L2-normalised over the HW pixels (B x HW)."""
    return F.normalize(f.square().mean(1).flatten(1), dim=1)


def channel_attention(f: torch.Tensor) -> torch.Tensor:
    """AKT Eq. 7: softmax over C of the mean over H, W of F^2 (B x C)."""
    return f.square().mean((2, 3)).softmax(1)


def softened_kl(a_s: torch.Tensor, a_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per image, KL(p_T || p_S) with p = softmax(a / T), summed over the distribution."""
    log_p_s = F.log_softmax(a_s / temperature, dim=1)
    log_p_t = F.log_softmax(a_t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)


@DISTILL_LOSS_REGISTRY.register()
class RFDLoss(DistillLoss):
    """Refined feature distillation, RFD (AKT Eq. 6-8).

    Per tap l and image: ``KL_sp + KL_ch``, where ``KL = KL(softmax(a_T / T) ||
    softmax(a_S / T))`` of the spatial attention a_sp (Eq. 6: L2-normalise over HW of the
    mean over C of F^2) and of the channel attention a_ch (Eq. 7: softmax over C of the
    mean over H, W of F^2), T = ``temperature`` (AKT's T_fd = 8).

    Taps (Eq. 8, ``reduction``):
    - "mean" (default): the batch mean per tap, then the mean over the N taps (the
      paper's 1/N sum). The paper's beta is the config's distillation weight.
    - "official": ``1000 * sum over taps and images`` (AKT's official code, beta = 1000
      inside; N * B * 1000 times "mean").

    ``attention``: "both" (the method), "spatial" or "channel" (one KL only: AKT Table 4's
    ablation).

    Student and teacher maps need the same C and H x W (the attentions are compared
    element by element).
    """

    name = "rfd"

    def __init__(self, *, temperature=8.0, reduction="mean", attention="both", **unknown):
        super().__init__()
        self.reject_unknown(unknown)
        self.check_positive("temperature", temperature)
        self.check_choice("reduction", reduction, ("mean", "official"))
        self.check_choice("attention", attention, ("both", "spatial", "channel"))
        self.temperature, self.reduction = temperature, reduction
        self.attentions = {
            "both": (spatial_attention, channel_attention),
            "spatial": (spatial_attention,),
            "channel": (channel_attention,),
        }[attention]

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        terms = []
        for i, (s, t) in enumerate(self.pairs(students, teachers)):
            self.check_maps(i, s, t, same_size=True)
            self.check_channels(i, s, t)
            per_image = sum(
                softened_kl(attend(s), attend(t), self.temperature) for attend in self.attentions
            )
            terms.append(per_image.mean() if self.reduction == "mean" else per_image.sum())
        terms = torch.stack(terms)
        return terms.mean() if self.reduction == "mean" else OFFICIAL_BETA * terms.sum()
