"""Feature-affinity distillation (FAQD): FA (Eq. 6) and its randomised fast form FFA
(Eq. 14-15). Both compare the pixel-to-pixel cosine affinities of the two maps, so the
student and the teacher may have different channels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qdet.distill.loss_base import DISTILL_LOSS_REGISTRY, DistillLoss, reduce_batch

REDUCTIONS = ("mean", "sum")


def unit_pixels(f: torch.Tensor, size, eps: float, align_corners: bool) -> torch.Tensor:
    """B x HW x C: the map resized to ``size`` (bilinear), every pixel's C-vector
    L2-normalised. The eps keeps an all-zero pixel (common after a ReLU) finite."""
    if tuple(f.shape[-2:]) != tuple(size):
        f = F.interpolate(f, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return F.normalize(f.flatten(2), dim=1, eps=eps).transpose(1, 2)


class _AffinityLoss(DistillLoss):
    """Shared options and the per-tap unit-pixel matrices of FA and FFA."""

    takes_connector = True

    def _check_common(self, reduction, eps, align_corners) -> None:
        self.check_choice("reduction", reduction, REDUCTIONS)
        self.check_positive("eps", eps)
        self.check_choice("align_corners", align_corners, (True, False))
        self.reduction, self.eps, self.align_corners = reduction, eps, align_corners

    def unit_pixel_pairs(self, students, teachers):
        """Per tap: (F_S, F_T, HW), the teacher resized to the student's H x W."""
        for i, (s, t) in enumerate(self.pairs(students, teachers)):
            self.check_maps(i, s, t, same_size=False)
            size = s.shape[-2:]
            f_s = unit_pixels(s, size, self.eps, self.align_corners)
            f_t = unit_pixels(t, size, self.eps, self.align_corners)
            yield f_s, f_t, size[0] * size[1]


@DISTILL_LOSS_REGISTRY.register()
class FeatureAffinityLoss(_AffinityLoss):
    """Feature affinity, FA (FAQD Eq. 6): ``||S_T - S_S||_F^2 / (HW)^2``.

    Per image, each map is flattened to F in R^{HW x C}, every pixel's C-vector is
    L2-normalised (eps), and ``S = F F^T`` (HW x HW cosine affinity). The teacher map is
    first resized bilinearly to the student's H x W; C may differ.

    Options: ``norm`` "fro2" (the paper's squared Frobenius norm, default) or "l1"
    (``sum |S_T - S_S| / (HW)^2``, FAQD's official code); ``reduction`` over the batch,
    "mean" (default) or "sum" (official code); ``eps`` (1e-5); ``align_corners`` of the
    teacher's resize (True, as the official code).

    ``algorithm``: "explicit" (default) forms the HW x HW matrices as the paper does:
    O((HW)^2 C) time, O((HW)^2) memory per image. "gram" (norm "fro2" only) gives the same
    value exactly from C x C Gram matrices, since ``||F_T F_T^T - F_S F_S^T||_F^2 =
    ||F_T^T F_T||^2 + ||F_S^T F_S||^2 - 2 ||F_S^T F_T||^2``: O(HW C^2) time, O(C^2) memory
    (``tools/benchmark_distill.py``). It subtracts near-equal sums, so it is computed in
    float64.

    Taps: the sum of the per-tap terms (FAQD sums its stage terms).
    """

    name = "fa"

    def __init__(
        self,
        *,
        norm="fro2",
        reduction="mean",
        eps=1e-5,
        align_corners=True,
        algorithm="explicit",
        **unknown,
    ):
        super().__init__()
        self.reject_unknown(unknown)
        self.check_choice("norm", norm, ("fro2", "l1"))
        self.check_choice("algorithm", algorithm, ("explicit", "gram"))
        if algorithm == "gram" and norm != "fro2":
            raise ValueError(
                f"distillation loss 'fa': algorithm='gram' needs norm='fro2' (the L1 norm "
                f"has no Gram form), got norm={norm!r}"
            )
        self.norm, self.algorithm = norm, algorithm
        self._check_common(reduction, eps, align_corners)

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        terms = []
        for f_s, f_t, hw in self.unit_pixel_pairs(students, teachers):
            if self.algorithm == "gram":
                per_image = _gram_fro2(f_s.double(), f_t.double()).to(f_s.dtype)
            else:
                diff = f_t @ f_t.transpose(1, 2) - f_s @ f_s.transpose(1, 2)  # B x HW x HW
                dist = diff.square() if self.norm == "fro2" else diff.abs()
                per_image = dist.sum((1, 2))
            terms.append(reduce_batch(per_image / hw**2, self.reduction))
        return torch.stack(terms).sum()


def _gram_fro2(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Per image ``||F_T F_T^T - F_S F_S^T||_F^2`` from B x C x C Gram matrices."""

    def sq(a, b):  # ||A^T B||_F^2
        return (a.transpose(1, 2) @ b).square().sum((1, 2))

    return sq(f_t, f_t) + sq(f_s, f_s) - 2 * sq(f_s, f_t)


def call_seed(seed: int, call: int) -> int:
    """The seed of FFA's draws at ``call``: NumPy's SeedSequence mixes (seed, call) into 32
    bits (what torch's CPU generator uses), so neighbouring seeds and calls give unrelated
    streams."""
    return int(np.random.SeedSequence([seed, call]).generate_state(1)[0])


@DISTILL_LOSS_REGISTRY.register()
class FastFeatureAffinityLoss(_AffinityLoss):
    """Fast feature affinity, FFA (FAQD Eq. 14-15): a random-projection estimate of FA.

    With Z in R^{HW x k}, i.i.d. N(0, 1), and F_S, F_T the unit-pixel matrices of FA:
    ``(S_T - S_S) Z = F_T (F_T^T Z) - F_S (F_S^T Z)``, never forming the HW x HW matrix:
    O(k HW C) operations and O(HW (C + k)) memory per image instead of O((HW)^2).

    ``estimate`` says what it estimates:
    - "fro2" (default): ``(1/k) ||(S_T - S_S) Z||_F^2 / (HW)^2``, an unbiased estimate of
      FA with norm "fro2" (E ||D z||^2 = ||D||_F^2).
    - "official_l1": ``(1/k) sum_j ||(S_T - S_S) z_j||_1 / (HW)^2``, FAQD's official
      "order 1" FFA. It estimates ``sqrt(2/pi) ||S_T - S_S||_{2,1} / (HW)^2`` (the sum of
      the rows' L2 norms), not FA itself. Pair it with ``reduction="sum"`` to run the
      official recipe as published.

    Z: a fresh B x HW x k draw per tap at every call (one independent Z per image, which
    lowers the variance of the batch mean), from the loss's own ``torch.Generator`` on
    the feature's device, seeded at call t (counted from 0) by :func:`call_seed`; the
    global RNG is never touched. Two losses with the same seed give the same sequence of
    values. The call count is a buffer (``calls``), saved in checkpoints, so a resumed run
    draws what the uninterrupted one would have. Z is drawn in float32, then cast, so the
    sequence does not depend on the dtype (CPU and CUDA generators differ).

    Options: ``k`` (15), ``seed`` (0), ``estimate`` ("fro2"), ``reduction`` over the
    batch ("mean" | "sum"), ``eps`` (1e-5), ``align_corners`` (True).
    Taps: the sum of the per-tap terms, as FA.
    """

    name = "ffa"

    def __init__(
        self,
        *,
        k=15,
        seed=0,
        estimate="fro2",
        reduction="mean",
        eps=1e-5,
        align_corners=True,
        **unknown,
    ):
        super().__init__()
        self.reject_unknown(unknown)
        self.check_positive("k", k, integer=True)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(
                f"distillation loss {self.name!r}: seed={seed!r} is invalid: "
                "valid values: an integer in [0, 2^31)"
            )
        self.check_choice("estimate", estimate, ("fro2", "official_l1"))
        self.k, self.seed, self.estimate = k, seed, estimate
        self._check_common(reduction, eps, align_corners)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]):
        terms, gen = [], None
        for f_s, f_t, hw in self.unit_pixel_pairs(students, teachers):
            if gen is None:  # one generator per call, its taps drawn in turn
                gen = torch.Generator(f_s.device)
                gen.manual_seed(call_seed(self.seed, int(self.calls)))
            shape = (f_s.shape[0], hw, self.k)
            z = torch.randn(shape, generator=gen, device=f_s.device).to(f_s.dtype)
            dz = f_t @ (f_t.transpose(1, 2) @ z) - f_s @ (f_s.transpose(1, 2) @ z)
            dist = dz.square() if self.estimate == "fro2" else dz.abs()
            per_image = dist.sum((1, 2)) / (self.k * hw**2)
            terms.append(reduce_batch(per_image, self.reduction))
        self.calls += 1
        return torch.stack(terms).sum()
